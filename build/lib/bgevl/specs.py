"""The one place where BGE-VL models and their graphs are declared.

Every other part (exporter, runtime, Triton configs, benchmarks) derives input names,
dtypes, shapes and dynamic axes from the declarations here, the way Optimum's
``OnnxConfig`` drives its exporter.

Two kinds of declaration:

* :class:`ModelSpec`: a model the command line accepts (``--model tiny|base|large``): where its
  weights come from and, for offline random-weight builds, its architecture.
* :class:`GraphSpec`: one ONNX graph (inputs, outputs, named dynamic axes with their
  min/opt/max ranges), built from a loaded model config by :func:`clip_graph_specs`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from bgevl.errors import BgevlError

#: ONNX opset of every exported graph. >= 17 so LayerNorm is exported as the
#: LayerNormalization op, which TensorRT maps to its normalization layer (FP16-safe).
ONNX_OPSET = 18

#: Default and max batch of the exported graphs' dynamic batch axis (TensorRT profiles,
#: Triton ``max_batch_size`` and benchmark sweeps read these).
DEFAULT_OPT_BATCH = 8
DEFAULT_MAX_BATCH = 64

PRECISIONS = ("fp32", "fp16", "int8")

#: Minimum cosine similarity to the PyTorch reference an export must reach, per precision.
#: Enforced on pretrained checkpoints; on random weights the figures are reported (see
#: ``bgevl.export.validate``).
COSINE_THRESHOLDS = {"fp32": 0.99999, "fp16": 0.999, "int8": 0.99}


@dataclass(frozen=True)
class Dim:
    """A dynamic axis: its name in the ONNX graph and the range the artifacts must serve."""

    name: str
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not (1 <= self.min <= self.opt <= self.max):
            raise ValueError(f"dynamic axis {self.name!r}: need 1 <= min <= opt <= max, got {self}")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "int64"
    shape: tuple[int | Dim, ...]
    description: str = ""

    def symbolic_shape(self) -> list[int | str]:
        """Shape with dynamic axes written as their names (the manifest's form)."""
        return [d.name if isinstance(d, Dim) else d for d in self.shape]

    def dynamic_axes(self) -> dict[int, Dim]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, Dim)}

    def concrete_shape(self, which: str = "opt", **overrides: int) -> tuple[int, ...]:
        """A concrete shape: each dynamic axis at its ``min``/``opt``/``max`` or an override."""
        return tuple(
            overrides.get(d.name, getattr(d, which)) if isinstance(d, Dim) else d for d in self.shape
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": self.symbolic_shape(),
            "dynamic_axes": {str(i): asdict(d) for i, d in self.dynamic_axes().items()},
            "description": self.description,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TensorSpec":
        dyn = {int(i): Dim(**d) for i, d in data.get("dynamic_axes", {}).items()}
        shape = tuple(dyn[i] if i in dyn else int(s) for i, s in enumerate(data["shape"]))
        return cls(data["name"], data["dtype"], shape, data.get("description", ""))


@dataclass(frozen=True)
class GraphSpec:
    """One exported graph: ``name`` is also its file stem (``vision.onnx``)."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    description: str = ""

    @property
    def filename(self) -> str:
        return f"{self.name}.onnx"

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "file": self.filename,
            "description": self.description,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "GraphSpec":
        return cls(
            name=data["name"],
            inputs=tuple(TensorSpec.from_json(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_json(t) for t in data["outputs"]),
            description=data.get("description", ""),
        )


# ---------------------------------------------------------------------------------------
# CLIP dual encoders (BGE-VL-base / BGE-VL-large)
# ---------------------------------------------------------------------------------------

#: Output names. ``*_embeds`` are L2-normalized (what retrieval uses); ``*_features`` are the
#: unnormalized projections, which score fusion needs (see ``bgevl.fusion``).
IMAGE_EMBEDS, IMAGE_FEATURES = "image_embeds", "image_features"
TEXT_EMBEDS, TEXT_FEATURES = "text_embeds", "text_features"
PIXEL_VALUES, INPUT_IDS, ATTENTION_MASK = "pixel_values", "input_ids", "attention_mask"
VISION_GRAPH, TEXT_GRAPH = "vision", "text"



def batch_dim(opt: int = DEFAULT_OPT_BATCH, max_batch: int = DEFAULT_MAX_BATCH) -> Dim:
    return Dim("batch", 1, min(opt, max_batch), max_batch)


def clip_graph_specs(
    *, image_size: int, max_text_length: int, embed_dim: int,
    opt_batch: int = DEFAULT_OPT_BATCH, max_batch: int = DEFAULT_MAX_BATCH,
) -> dict[str, GraphSpec]:
    """The two graphs of a CLIP dual encoder, with projection and L2 norm inside the graph."""
    batch = batch_dim(opt_batch, max_batch)
    seq = Dim("sequence", 1, min(16, max_text_length), max_text_length)
    vision = GraphSpec(
        VISION_GRAPH,
        inputs=(TensorSpec(PIXEL_VALUES, "float32", (batch, 3, image_size, image_size),
                           "CLIP-normalized RGB pixels from the model's CLIPImageProcessor"),),
        outputs=(
            TensorSpec(IMAGE_EMBEDS, "float32", (batch, embed_dim), "L2-normalized image embedding"),
            TensorSpec(IMAGE_FEATURES, "float32", (batch, embed_dim),
                       "unnormalized projected image features (input of score fusion)"),
        ),
        description="vision tower: CLS after post_layernorm -> visual_projection -> L2 normalize",
    )
    text = GraphSpec(
        TEXT_GRAPH,
        inputs=(
            TensorSpec(INPUT_IDS, "int64", (batch, seq), "CLIP BPE token ids, <|startoftext|> ... <|endoftext|>"),
            TensorSpec(ATTENTION_MASK, "int64", (batch, seq), "1 for tokens, 0 for padding"),
        ),
        outputs=(
            TensorSpec(TEXT_EMBEDS, "float32", (batch, embed_dim), "L2-normalized text embedding"),
            TensorSpec(TEXT_FEATURES, "float32", (batch, embed_dim),
                       "unnormalized projected text features (input of score fusion)"),
        ),
        description="text tower: EOS-token pooling after final_layer_norm -> text_projection -> L2 normalize",
    )
    return {VISION_GRAPH: vision, TEXT_GRAPH: text}


def clip_graph_specs_from_config(config: Any, **batch: int) -> dict[str, GraphSpec]:
    """Graph specs from a transformers ``CLIPConfig``."""
    return clip_graph_specs(
        image_size=config.vision_config.image_size,
        max_text_length=config.text_config.max_position_embeddings,
        embed_dim=config.projection_dim,
        **batch,
    )


# ---------------------------------------------------------------------------------------
# LLaVA-NeXT embedders (BGE-VL-MLLM-S1 / -S2)
# ---------------------------------------------------------------------------------------

#: Graph and tensor names of the MLLM export. The image features enter the language graph as a
#: table; ``image_feature_index`` (computed during preprocessing from each image's size: anyres
#: grid, unpadding, ``image_newline`` positions) says which row fills each sequence position.
MLLM_VISION_GRAPH, MLLM_LANGUAGE_GRAPH = "mllm_vision", "mllm_language"
IMAGE_TILES, TILE_FEATURES = "image_tiles", "tile_features"
IMAGE_FEATURE_INDEX = "image_feature_index"
EMBEDDING, POOLED_HIDDEN = "embeds", "pooled_hidden"
#: Values of ``image_feature_index``: -1 = text token (use the token embedding), 0 = the
#: ``image_newline`` vector, k >= 1 = row k-1 of the flattened ``tile_features``.
TEXT_POSITION, NEWLINE_ROW = -1, 0

#: For each graph with a normalized output: (normalized output, unnormalized output). The
#: exporter keeps the nodes between the two in float32 (they are the final L2 normalization).
NORMALIZED_OUTPUTS = {
    VISION_GRAPH: (IMAGE_EMBEDS, IMAGE_FEATURES),
    TEXT_GRAPH: (TEXT_EMBEDS, TEXT_FEATURES),
    MLLM_LANGUAGE_GRAPH: (EMBEDDING, POOLED_HIDDEN),
}

#: Default longest sequence (prompt + image tokens) of the language graph. One 512x512 image
#: is 2928 tokens on BGE-VL-MLLM (576 base + 48x48 unpadded grid + 48 newlines).
DEFAULT_MAX_SEQUENCE = 4096
MLLM_OPT_BATCH, MLLM_MAX_BATCH = 2, 8


def mllm_graph_specs(
    *, tile_size: int, tile_tokens: int, hidden_size: int, max_sequence: int = DEFAULT_MAX_SEQUENCE,
    max_tiles_per_image: int = 5, opt_batch: int = DEFAULT_OPT_BATCH, max_batch: int = DEFAULT_MAX_BATCH,
) -> dict[str, GraphSpec]:
    """The two graphs of a LLaVA-NeXT embedder (see ``bgevl.export.mllm_modules``)."""
    batch = batch_dim(opt_batch, max_batch)
    tiles = Dim("tiles", 1, max_tiles_per_image * min(opt_batch, max_batch), max_tiles_per_image * max_batch)
    seq = Dim("sequence", 1, min(max_sequence, 3072), max_sequence)
    vision = GraphSpec(
        MLLM_VISION_GRAPH,
        inputs=(TensorSpec(IMAGE_TILES, "float32", (tiles, 3, tile_size, tile_size),
                           "anyres tiles of all images in the batch (base tile first per image), "
                           "CLIP-normalized, from the model's LlavaNextImageProcessor"),),
        outputs=(TensorSpec(TILE_FEATURES, "float32", (tiles, tile_tokens, hidden_size),
                            "vision tower hidden state at vision_feature_layer, CLS dropped, "
                            "through the multi-modal projector"),),
        description="vision tower (CLIP ViT) up to vision_feature_layer -> multi-modal projector",
    )
    language = GraphSpec(
        MLLM_LANGUAGE_GRAPH,
        inputs=(
            TensorSpec(INPUT_IDS, "int64", (batch, seq), "prompt token ids with <image> placeholders expanded"),
            TensorSpec(ATTENTION_MASK, "int64", (batch, seq), "1 for tokens, 0 for padding (left or right)"),
            TensorSpec(TILE_FEATURES, "float32", (tiles, tile_tokens, hidden_size),
                       "mllm_vision output; one all-zero tile when the batch has no image"),
            TensorSpec(IMAGE_FEATURE_INDEX, "int64", (batch, seq),
                       "-1: text token; 0: image_newline; k>=1: flattened tile_features row k-1"),
        ),
        outputs=(
            TensorSpec(EMBEDDING, "float32", (batch, hidden_size),
                       "L2-normalized last-layer hidden state of the last non-padding token"),
            TensorSpec(POOLED_HIDDEN, "float32", (batch, hidden_size),
                       "the same hidden state before normalization"),
        ),
        description="token embedding + image feature placement -> decoder -> final norm -> "
                    "last non-padding token (by attention mask) -> L2 normalize; no LM head",
    )
    return {MLLM_VISION_GRAPH: vision, MLLM_LANGUAGE_GRAPH: language}


def mllm_graph_specs_from_config(config: Any, **kw: int) -> dict[str, GraphSpec]:
    """Graph specs from a transformers ``LlavaNextConfig``."""
    vc = config.vision_config
    grid = vc.image_size // vc.patch_size
    tile_tokens = grid * grid + (0 if config.vision_feature_select_strategy == "default" else 1)
    pinpoints = config.image_grid_pinpoints
    max_tiles = 1 + max((h // vc.image_size) * (w // vc.image_size) for h, w in pinpoints)
    return mllm_graph_specs(tile_size=vc.image_size, tile_tokens=tile_tokens, hidden_size=config.text_config.hidden_size,
                            max_tiles_per_image=max_tiles, **kw)


# ---------------------------------------------------------------------------------------
# Serving API (the Triton repository's entry model; clients and benchmarks use these names)
# ---------------------------------------------------------------------------------------

#: Inputs and output of the entry model ``<name>`` of a generated Triton repository. TEXT and
#: IMAGE are BYTES (UTF-8 text, encoded image files), each optional: send either or both.
#: INSTRUCTION and ROLE (MLLM only, BYTES [1]) are the query task instruction and
#: ``query``/``candidate``.
SERVING_TEXT, SERVING_IMAGE, SERVING_INSTRUCTION, SERVING_ROLE = "TEXT", "IMAGE", "INSTRUCTION", "ROLE"
SERVING_EMBEDDING = "EMBEDDING"
DEFAULT_SERVING_NAME = "bgevl"


# ---------------------------------------------------------------------------------------
# Model registry
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    key: str
    family: str  # "clip" or "mllm"
    description: str
    hub_id: str | None = None
    #: transformers config kwargs of the architecture (CLIPConfig / LlavaNextConfig), for
    #: offline random-weight builds.
    architecture: Mapping[str, Any] = field(default_factory=dict)
    #: Parameters in billions: the exporter refuses fp32 above FP32_LIMIT_BILLIONS unless forced.
    billions: float = 0.0

    @property
    def default_batch(self) -> tuple[int, int]:
        """(opt, max) batch when the command line gives none: a 7B prefill of ~3k tokens per
        item is far heavier than a CLIP tower, so the MLLM graphs default to smaller batches."""
        return (DEFAULT_OPT_BATCH, DEFAULT_MAX_BATCH) if self.family == "clip" else (MLLM_OPT_BATCH, MLLM_MAX_BATCH)

    @property
    def generated(self) -> bool:
        """True for the embedded tiny models generated offline (no hub id)."""
        return self.hub_id is None


def _clip_arch(*, text_width: int, text_layers: int, text_heads: int, vision_width: int,
               vision_layers: int, vision_heads: int, patch: int, image_size: int, proj: int,
               vocab_size: int = 49408) -> dict[str, Any]:
    return {
        "text_config": {
            "vocab_size": vocab_size, "hidden_size": text_width, "intermediate_size": 4 * text_width,
            "num_hidden_layers": text_layers, "num_attention_heads": text_heads,
            "max_position_embeddings": 77, "hidden_act": "quick_gelu",
        },
        "vision_config": {
            "hidden_size": vision_width, "intermediate_size": 4 * vision_width,
            "num_hidden_layers": vision_layers, "num_attention_heads": vision_heads,
            "image_size": image_size, "patch_size": patch, "hidden_act": "quick_gelu",
        },
        "projection_dim": proj,
    }


def _llava_next_arch(*, vision: dict[str, Any], text: dict[str, Any], tile: int) -> dict[str, Any]:
    """LlavaNextConfig kwargs: CLIP vision tower, Mistral text model, anyres pinpoints of
    llava-v1.6-mistral (1x2, 2x1, 2x2, 1x3, 3x1 tiles) scaled to the tile size."""
    return {
        "vision_config": {"model_type": "clip_vision_model", "hidden_act": "quick_gelu", "projection_dim": 768,
                          **vision},
        "text_config": {"model_type": "mistral", "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
                        "rope_theta": 1000000.0, "sliding_window": None, "hidden_act": "silu", **text},
        "image_grid_pinpoints": [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile], [3 * tile, tile], [tile, 3 * tile]],
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu",
        "tie_word_embeddings": False,
    }


#: llava-v1.6-mistral-7b as BGE-VL-MLLM uses it (public config printouts; see
#: ../shared/reference/bgevl-semantics.md): CLIP ViT-L/14-336, Mistral-7B, vocab 32005.
_LLAVA_NEXT_MISTRAL_7B = _llava_next_arch(
    vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=336, patch_size=14),
    text=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
              num_key_value_heads=8, vocab_size=32005),
    tile=336,
)


MODELS: dict[str, ModelSpec] = {
    "tiny": ModelSpec(
        "tiny", "clip",
        "small random-weight CLIP (same architecture as BGE-VL-base, 2 layers, width 32), generated offline",
        architecture=_clip_arch(text_width=32, text_layers=2, text_heads=2, vision_width=32,
                                vision_layers=2, vision_heads=2, patch=32, image_size=224, proj=16,
                                vocab_size=0),  # vocab size comes from the generated tokenizer
    ),
    "base": ModelSpec(
        "base", "clip", "BAAI/BGE-VL-base: CLIP ViT-B/16 dual encoder (150M parameters)",
        hub_id="BAAI/BGE-VL-base",
        architecture=_clip_arch(text_width=512, text_layers=12, text_heads=8, vision_width=768,
                                vision_layers=12, vision_heads=12, patch=16, image_size=224, proj=512),
    ),
    "large": ModelSpec(
        "large", "clip", "BAAI/BGE-VL-large: CLIP ViT-L/14 dual encoder (428M parameters)",
        hub_id="BAAI/BGE-VL-large",
        architecture=_clip_arch(text_width=768, text_layers=12, text_heads=12, vision_width=1024,
                                vision_layers=24, vision_heads=16, patch=14, image_size=224, proj=768),
    ),
    "tiny-mllm": ModelSpec(
        "tiny-mllm", "mllm",
        "small random-weight LLaVA-NeXT embedder (same architecture as BGE-VL-MLLM: CLIP ViT + "
        "projector + Mistral, 2 layers, width 64, 56px tiles), generated offline",
        architecture=_llava_next_arch(
            vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                        image_size=56, patch_size=14),
            text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=0),
            tile=56),
    ),
    "mllm-s1": ModelSpec(
        "mllm-s1", "mllm", "BAAI/BGE-VL-MLLM-S1: LLaVA-NeXT (CLIP ViT-L/14-336 + Mistral-7B) embedder (7.57B parameters)",
        hub_id="BAAI/BGE-VL-MLLM-S1", architecture=_LLAVA_NEXT_MISTRAL_7B, billions=7.57,
    ),
    "mllm-s2": ModelSpec(
        "mllm-s2", "mllm", "BAAI/BGE-VL-MLLM-S2: BGE-VL-MLLM-S1 fine-tuned on MMEB (7.57B parameters)",
        hub_id="BAAI/BGE-VL-MLLM-S2", architecture=_LLAVA_NEXT_MISTRAL_7B, billions=7.57,
    ),
    # BGE-VL-v1.5: the same LLaVA-1.6-Mistral architecture, used "in the exact same way" (model card)
    "mllm-v1.5-zs": ModelSpec(
        "mllm-v1.5-zs", "mllm", "BAAI/BGE-VL-v1.5-zs: LLaVA-NeXT (CLIP ViT-L/14-336 + Mistral-7B) embedder, zero-shot",
        hub_id="BAAI/BGE-VL-v1.5-zs", architecture=_LLAVA_NEXT_MISTRAL_7B, billions=7.57,
    ),
    "mllm-v1.5-mmeb": ModelSpec(
        "mllm-v1.5-mmeb", "mllm", "BAAI/BGE-VL-v1.5-mmeb: BGE-VL-v1.5 fine-tuned on MMEB",
        hub_id="BAAI/BGE-VL-v1.5-mmeb", architecture=_LLAVA_NEXT_MISTRAL_7B, billions=7.57,
    ),
}

#: Above this size an fp32 export needs ``--force-fp32``: the weights alone are 4 bytes per
#: parameter (30 GB for the 7B MLLM), and export holds about two copies in memory.
FP32_LIMIT_BILLIONS = 2.0


def get_model_spec(key: str) -> ModelSpec:
    try:
        return MODELS[key]
    except KeyError:
        raise BgevlError(f"unknown model {key!r}; choose one of: {', '.join(MODELS)}") from None


def graph_specs_to_json(specs: Mapping[str, GraphSpec]) -> dict[str, Any]:
    return {name: spec.to_json() for name, spec in specs.items()}

