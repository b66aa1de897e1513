"""The MLLM family: BGE-VL-MLLM-S1 / -S2 and BGE-VL-v1.5, LLaVA-NeXT (Mistral-7B) embedders.

The embedding is the L2-normalized last-layer hidden state of the last token; queries carry a
task instruction (a decoder embedder: ``bgevl.families.decoder``, which it shares with BGE-VL-Screenshot).
Files: ``graphs``, ``checkpoint``, ``modules``, ``reference``, ``preprocessing`` (prompts, anyres
layout, image-feature index), ``bench``.

Precisions: fp32 as exported (the 7B models declare ``fp32_too_large``: refused unless
``--force-fp32``); fp16 with LayerNorm, Softmax, every RMSNorm, the rotary angles and the final
L2 normalization kept in float32; int8 **weight-only** (activations stay float): ``qdq`` writes
int8 weights + DequantizeLinear (TensorRT weight-only INT8, ONNX Runtime), ``dynamic`` ONNX
Runtime's MatMulNBits (8 bits). Not static activation quantization: the activations of 7B
decoders carry outlier channels that per-tensor int8 ranges cannot hold (LLM.int8(),
SmoothQuant), so W8A8 from a MinMax calibration costs far more accuracy than weight-only int8.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from bgevl.core.family import CANDIDATE, QUERY, Call, CheckpointKind, ExportedModel, Feeds, Original, Preprocessor, Request, Steps, TorchBaseline
from bgevl.core.specs import ATTENTION_MASK, INPUT_IDS, GraphSpec, ModelSpec
from bgevl.families.decoder import DecoderEmbedderFamily
from bgevl.families.mllm.graphs import (
    EMBEDDING, IMAGE_FEATURE_INDEX, IMAGE_TILES, MLLM_LANGUAGE_GRAPH, MLLM_MAX_BATCH, MLLM_OPT_BATCH, MLLM_VISION_GRAPH,
    TILE_FEATURES, mllm_graph_specs_from_config,
)
from bgevl.families.mllm.preprocessing import CIR_INSTRUCTION

if TYPE_CHECKING:  # pragma: no cover  (types only)
    import torch

    from bgevl.core.options import ExportOptions
    from bgevl.core.preprocessing import InputLimits
    from bgevl.core.probes import ProbeSet

#: Items per validation request: image-only, text-only and composed items mixed in each.
VALIDATION_BATCH = 4
#: The Triton ``image_resize`` option's "as the manifest says".
_FROM_RECIPE = object()

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


#: llava-v1.6-mistral-7b as BGE-VL-MLLM uses it (the config.json of BAAI/BGE-VL-MLLM-S1 and
#: llava-hf/llava-v1.6-mistral-7b-hf): CLIP ViT-L/14-336, Mistral-7B, vocab 32005.
_LLAVA_NEXT_MISTRAL_7B = _llava_next_arch(
    vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=336, patch_size=14),
    text=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
              num_key_value_heads=8, vocab_size=32005),
    tile=336,
)



MODELS = (
    ModelSpec(
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
    ModelSpec(
        "mllm-s1", "mllm", "BAAI/BGE-VL-MLLM-S1: LLaVA-NeXT (CLIP ViT-L/14-336 + Mistral-7B) embedder (7.57B parameters)",
        hub_id="BAAI/BGE-VL-MLLM-S1", architecture=_LLAVA_NEXT_MISTRAL_7B, billions=7.57, fp32_too_large=True,
    ),
    ModelSpec(
        "mllm-s2", "mllm", "BAAI/BGE-VL-MLLM-S2: BGE-VL-MLLM-S1 fine-tuned on MMEB (7.57B parameters)",
        hub_id="BAAI/BGE-VL-MLLM-S2", architecture=_LLAVA_NEXT_MISTRAL_7B, billions=7.57, fp32_too_large=True,
    ),
    # BGE-VL-v1.5: the same LLaVA-1.6-Mistral architecture, used "in the exact same way" (model card)
    ModelSpec(
        "mllm-v1.5-zs", "mllm", "BAAI/BGE-VL-v1.5-zs: LLaVA-NeXT (CLIP ViT-L/14-336 + Mistral-7B) embedder, zero-shot",
        hub_id="BAAI/BGE-VL-v1.5-zs", architecture=_LLAVA_NEXT_MISTRAL_7B, billions=7.57, fp32_too_large=True,
    ),
    ModelSpec(
        "mllm-v1.5-mmeb", "mllm", "BAAI/BGE-VL-v1.5-mmeb: BGE-VL-v1.5 fine-tuned on MMEB",
        hub_id="BAAI/BGE-VL-v1.5-mmeb", architecture=_LLAVA_NEXT_MISTRAL_7B, billions=7.57, fp32_too_large=True,
    ),
)


class MllmFamily(DecoderEmbedderFamily):
    name = "mllm"
    description = "LLaVA-NeXT embedders (BGE-VL-MLLM-S1/-S2, BGE-VL-v1.5): last-token hidden state, task instructions"
    models = MODELS
    vision_graph, language_graph = MLLM_VISION_GRAPH, MLLM_LANGUAGE_GRAPH
    query_instruction = CIR_INSTRUCTION
    int8_refusal = "the MLLM's int8 is weight-only; use qdq or dynamic"  # its own words
    default_batch = (MLLM_OPT_BATCH, MLLM_MAX_BATCH)
    profile_axes = {"tiles": "image tiles per batch"}  # build-engines --max-tiles
    checkpoint_kind = CheckpointKind(
        "llava_next", "LLaVA-NeXT embedder (LlavaNextForConditionalGeneration)", "LlavaNextConfig",
        (("tokenizer.json",), ("tokenizer.model",)),
        ("vision_config.hidden_size", "vision_config.num_hidden_layers", "vision_config.patch_size",
         "vision_config.image_size", "text_config.hidden_size", "text_config.num_hidden_layers",
         "text_config.num_key_value_heads", "text_config.intermediate_size"),
    )
    # prompts, anyres tiles and the feature index; the tiles only where a request has images
    preprocess_feeds = ((INPUT_IDS, ATTENTION_MASK, IMAGE_FEATURE_INDEX), (IMAGE_TILES,))

    # --- checkpoints -------------------------------------------------------------------
    def generate_checkpoint(self, spec: ModelSpec, directory: Path) -> Path:
        from bgevl.families.mllm.checkpoint import generate_mllm_checkpoint

        return generate_mllm_checkpoint(spec, directory)

    def load(self, path: Path, spec: ModelSpec | None = None, attn_implementation: str = "eager") -> tuple[Any, Any]:
        from bgevl.families.mllm.checkpoint import load_mllm

        return load_mllm(path, attn_implementation, spec)

    def original(self, path: Path, recipe: Mapping[str, Any] | None = None) -> Original:
        from bgevl.families.mllm.reference import OriginalLlavaEmbedder

        return OriginalLlavaEmbedder(path)

    # --- export ------------------------------------------------------------------------
    def prepare_export(self, path: Path, spec: ModelSpec, options: ExportOptions) -> ExportedModel:
        from bgevl.families.mllm.preprocessing import BGEVL_IMAGE_RESIZE, ImageLayout, MllmPreprocessor

        model, processor = self.load(path, spec)
        config = model.config
        layout = ImageLayout.from_config(config)
        # the export driver resolves the batch range (None: the family default) before prepare_export
        assert options.opt_batch is not None and options.max_batch is not None
        graphs = mllm_graph_specs_from_config(config, opt_batch=options.opt_batch, max_batch=options.max_batch,
                                              max_sequence=options.max_sequence_length)
        hidden = int(config.text_config.hidden_size)
        parameters = sum(p.numel() for p in model.parameters()) - model.lm_head.weight.numel()
        padding = processor.tokenizer.padding_side
        # validation preprocesses as the runtime does by default (BGE-VL's 512x512 resize before the RGB
        # conversion); tests/test_mllm.py covers the anyres grids of images at their own sizes
        return ExportedModel(
            model, processor, graphs, MllmPreprocessor(processor, layout, options.max_sequence_length),
            embedding_dim=hidden, max_text_length=int(options.max_sequence_length), parameters=int(parameters),
            recipe={"image_layout": layout.to_json(), "image_resize": list(BGEVL_IMAGE_RESIZE), "padding_side": padding,
                    "default_query_instruction": CIR_INSTRUCTION,
                    "prompt_source": "VectorSpaceLab/MegaPairs LLaVANextForEmbedding.prepare_text_input"},
            summary=f"{parameters / 1e6:.1f}M parameters without the LM head, embedding dim {hidden}, tokenizer "
                    f"padding side {padding}")

    def graph_modules(self, exported: ExportedModel) -> dict[str, torch.nn.Module]:
        from bgevl.families.mllm.modules import graph_modules

        return graph_modules(exported.model)

    def example_feeds(self, graphs: Mapping[str, GraphSpec], modules: Mapping[str, torch.nn.Module],
                      requests: Sequence[Feeds]) -> dict[str, Feeds]:
        """A request with at least two tiles and two items; the language graph's tile features are the
        vision module's output on them."""
        import torch

        example = next(f for f in requests if IMAGE_TILES in f and len(f[IMAGE_TILES]) >= 2 and len(f[INPUT_IDS]) >= 2)
        with torch.inference_mode():
            tiles = modules[MLLM_VISION_GRAPH](torch.from_numpy(example[IMAGE_TILES])).numpy()
        language = {k: example[k] for k in (INPUT_IDS, ATTENTION_MASK, IMAGE_FEATURE_INDEX)}
        language[TILE_FEATURES] = tiles
        return {MLLM_VISION_GRAPH: {IMAGE_TILES: example[IMAGE_TILES]}, MLLM_LANGUAGE_GRAPH: language}

    def validation_requests(self, probes: ProbeSet) -> list[Request]:
        """Image-only and text-only candidates, composed and text-only queries (with BGE-VL's CIR
        instruction), interleaved so that every request of ``VALIDATION_BATCH`` items is mixed."""
        n = len(probes.images)
        items: list[tuple[Any, str | None, str]] = []
        for i in range(n):
            img, txt = probes.composed[i]
            items += [(probes.images[i], None, CANDIDATE), (None, probes.texts[i], CANDIDATE),
                      (probes.images[img], probes.texts[txt], QUERY), (None, probes.texts[(i + 2) % n], QUERY)]
        requests = []
        for start in range(0, len(items), VALIDATION_BATCH):
            batch = items[start:start + VALIDATION_BATCH]
            for role in (CANDIDATE, QUERY):
                part = [it for it in batch if it[2] == role]
                if part:
                    images = [it[0] for it in part] if any(it[0] is not None for it in part) else None
                    texts = [it[1] for it in part] if any(it[1] is not None for it in part) else None
                    requests.append(Request(images, texts, role, CIR_INSTRUCTION if role == QUERY else None))
        return requests

    def probe_description(self, exported: ExportedModel) -> dict[str, Any]:
        resize = exported.recipe["image_resize"]
        return {"batch": VALIDATION_BATCH, "image_resize": f"{resize[0]}x{resize[1]} before RGB, as the original"}

    # --- the embedding recipe ----------------------------------------------------------
    def steps(self, feeds: Feeds, graphs: Mapping[str, GraphSpec]) -> Steps:
        """Vision graph on the image tiles (one all-zero tile when no item has an image), then the pooled
        language graph with the tile features placed by ``image_feature_index``."""
        if IMAGE_TILES in feeds:
            (vision,) = yield [Call(MLLM_VISION_GRAPH, {IMAGE_TILES: feeds[IMAGE_TILES]}, (TILE_FEATURES,))]
            tiles = np.asarray(vision[TILE_FEATURES], np.float32)
        else:
            _, tile_tokens, hidden = graphs[MLLM_LANGUAGE_GRAPH].input(TILE_FEATURES).shape
            assert isinstance(tile_tokens, int) and isinstance(hidden, int)  # fixed axes (mllm_graph_specs)
            tiles = np.zeros((1, tile_tokens, hidden), np.float32)
        language = {INPUT_IDS: feeds[INPUT_IDS], ATTENTION_MASK: feeds[ATTENTION_MASK], TILE_FEATURES: tiles,
                    IMAGE_FEATURE_INDEX: feeds[IMAGE_FEATURE_INDEX]}
        (out,) = yield [Call(MLLM_LANGUAGE_GRAPH, language, (EMBEDDING,))]
        return out[EMBEDDING]

    def open_preprocessor(self, processor_dir: Path, recipe: Mapping[str, Any], max_text_length: int,
                          limits: InputLimits, text_overflow: str = "truncate", image_resize: Any = _FROM_RECIPE,
                          **options: Any) -> Preprocessor:
        """``image_resize``: default BGE-VL's 512x512 (the manifest's); ``None`` keeps the images' own sizes.
        ``text_overflow`` does not apply: an over-long prompt is refused (truncation would cut the image
        tokens or the final ``[/INST]`` the embedding is read from)."""
        from bgevl.families.mllm.preprocessing import BGEVL_IMAGE_RESIZE, ImageLayout, MllmPreprocessor

        if options:
            raise TypeError(f"unexpected options for an MLLM export: {', '.join(options)}")
        resize = recipe.get("image_resize", BGEVL_IMAGE_RESIZE) if image_resize is _FROM_RECIPE else image_resize
        return MllmPreprocessor.from_pretrained(processor_dir, ImageLayout.from_json(recipe["image_layout"]),
                                                max_text_length, resize, limits)

    # --- benchmarks --------------------------------------------------------------------
    def torch_baseline(self, checkpoint: Path, threads: int) -> TorchBaseline:
        from bgevl.families.mllm.bench import MllmBaseline

        return MllmBaseline(self, checkpoint, threads)


