"""The Visualized-BGE family: bge-visualized-base-en-v1.5 and bge-visualized-m3 (BAAI/bge-visualized).

An EVA02-CLIP vision tower whose patch tokens, projected by ``visual_proj``, are placed after the
text's [CLS] in the BGE text encoder (BERT for base, XLM-RoBERTa for m3); the embedding is the
L2-normalized CLS. Image-only items are the multimodal path with the empty prompt, text-only items
the plain text model (FlagOpen/FlagEmbedding ``research/visual_bge``, ``Visualized_BGE.encode``).

Files: ``graphs`` (graph declarations), ``modeling`` (the torch modules exported), ``checkpoint``
(the published ``.pth`` layout, checked loader, offline generator), ``reference`` (the original's
fp32 embeddings), ``preprocessing`` (EVA-CLIP transform, tokenizer and position limits), ``bench``
(the PyTorch baseline).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, cast

import numpy as np
from numpy.typing import NDArray

from bgevl.core.errors import BgevlError
from bgevl.core.family import (
    Call, CheckpointKind, ExportedModel, Family, Feeds, Int8Form, Original, Preprocessor, Request, Steps, TorchBaseline,
    TritonModels,
)
from bgevl.families.visualized.models import MODELS
from bgevl.families.visualized.graphs import EMBEDDING, IMAGE_TOKENS, TEXT_GRAPH, VISION_GRAPH, visualized_graph_specs
from bgevl.core.specs import (
    ATTENTION_MASK, DEFAULT_MAX_BATCH, DEFAULT_OPT_BATCH, INPUT_IDS, PIXEL_VALUES, SERVING_IMAGE, SERVING_TEXT,
    GraphSpec, ModelSpec,
)

if TYPE_CHECKING:  # pragma: no cover  (types only)
    import onnx
    import torch

    from bgevl.core.options import ExportOptions
    from bgevl.core.preprocessing import InputLimits
    from bgevl.core.probes import ProbeSet
    from bgevl.families.visualized.modeling import VisualizedBGE
    from bgevl.families.visualized.preprocessing import TextLayout


#: The manifest's recipe section names where the semantics come from.
_SOURCE = "FlagOpen/FlagEmbedding research/visual_bge/visual_bge/modeling.py Visualized_BGE.encode"


class VisualizedFamily(Family):
    name = "visualized"
    description = ("Visualized-BGE (bge-visualized-base-en-v1.5, bge-visualized-m3): EVA-CLIP image tokens in the "
                   "BGE text encoder, CLS pooling")
    models = MODELS
    default_batch = (DEFAULT_OPT_BATCH, DEFAULT_MAX_BATCH)
    int8_refusal = "Visualized-BGE's int8 is weight-only QDQ or dynamic; use qdq or dynamic"
    int8_forms = (
        Int8Form("weight-only-qdq", "int8 weights + DequantizeLinear into the MatMuls, float activations (TensorRT "
                 "weight-only INT8, ONNX Runtime)", calibrated=False, mode="qdq"),
        Int8Form("dynamic", "ONNX Runtime dynamic quantization (int8 weights, activations quantized at run time; CPU "
                 "only)", calibrated=False, mode="dynamic"),
    )
    checkpoint_kind = CheckpointKind(
        "visualized-bge", "Visualized-BGE (.pth + text model config and tokenizer)", "", (), ())
    serving_inputs = (SERVING_IMAGE, SERVING_TEXT)

    # --- checkpoints -------------------------------------------------------------------
    def local_checkpoint(self, path: Path) -> Path:
        from bgevl.families.visualized.checkpoint import locate

        locate(path)
        return path

    def download(self, spec: ModelSpec) -> Path:
        """``weights_file`` of ``BAAI/bge-visualized`` and the text model's files (cache first)."""
        from bgevl.checkpoints import download_repository
        from bgevl.families.visualized.checkpoint import TEXT_PATTERNS

        weights: Path = (download_repository(spec, (spec.architecture["weights_file"],))
                         / spec.architecture["weights_file"])
        download_repository(spec, TEXT_PATTERNS, spec.architecture["text_hub_id"])
        return weights

    def check_files(self, path: Path, spec: ModelSpec, report: Callable[[str], None]) -> None:
        from bgevl.families.visualized.checkpoint import inspect_visualized, load_tokenizer

        ckpt = inspect_visualized(path, spec)
        stored = sorted({str(t.dtype).removeprefix("torch.") for t in ckpt.state.values()})
        report(f"{ckpt.files.weights}: {len(ckpt.state)} tensors stored as {', '.join(stored)}, read with "
               f"weights_only=True; EVA-CLIP tower patch {ckpt.vision.patch_size}, width {ckpt.vision.width}, "
               f"{ckpt.vision.layers} layers")
        report(f"text model {ckpt.text_config.model_type} ({ckpt.files.text_dir}): hidden {ckpt.text_config.hidden_size}, "
               f"{ckpt.text_config.num_hidden_layers} layers; every tensor present with its shape, none unexpected")
        tokenizer = load_tokenizer(ckpt.files.text_dir)
        report(f"tokenizer {type(tokenizer).__name__} ({len(tokenizer)} tokens)")

    def generate_checkpoint(self, spec: ModelSpec, directory: Path) -> Path:
        from bgevl.families.visualized.checkpoint import generate_visualized_checkpoint

        return generate_visualized_checkpoint(spec, directory)

    def load(self, path: Path, spec: ModelSpec | None = None, attn_implementation: str = "eager") -> tuple[Any, Any]:
        from bgevl.families.visualized.checkpoint import load_visualized

        return load_visualized(path, spec, attn_implementation)

    def original(self, path: Path, recipe: Mapping[str, Any] | None = None) -> Original:
        from bgevl.families.visualized.reference import OriginalVisualized

        return OriginalVisualized(path)

    # --- export ------------------------------------------------------------------------
    def check_export_options(self, spec: ModelSpec, options: ExportOptions) -> None:
        if options.calibration_data is not None:
            raise BgevlError("--calibration-data does not apply to Visualized-BGE: its int8 forms need no calibration "
                             "(weight-only QDQ, or ONNX Runtime's dynamic quantization)")

    @staticmethod
    def layout_of(model: Any, max_sequence_length: int) -> TextLayout:
        from bgevl.families.visualized.preprocessing import TextLayout

        positions = int(model.text_config.max_position_embeddings)
        model_type = model.text_config.model_type
        text_only = positions - (2 if model_type == "xlm-roberta" else 0)
        return TextLayout(model.vision_config.image_size, model.vision_config.num_patches, positions, model_type,
                          min(text_only, int(max_sequence_length)))

    @staticmethod
    def graph_specs(model: Any, layout: TextLayout, opt_batch: int, max_batch: int) -> dict[str, GraphSpec]:
        """The graphs of a loaded model (``modeling.VisualizedBGE``) with its text layout."""
        return visualized_graph_specs(image_size=layout.image_size, image_tokens=layout.image_tokens,
                                      hidden=int(model.text_config.hidden_size),
                                      vocab_size=int(model.text_config.vocab_size), max_text_length=layout.max_text_length,
                                      opt_batch=opt_batch, max_batch=max_batch)

    def prepare_export(self, path: Path, spec: ModelSpec, options: ExportOptions) -> ExportedModel:
        from bgevl.families.visualized.preprocessing import VisualizedPreprocessor

        model, tokenizer = self.load(path, spec, options.attn_implementation)
        layout = self.layout_of(model, options.max_sequence_length)
        hidden = int(model.text_config.hidden_size)
        # the export driver resolves the batch range (None: the family default) before prepare_export
        assert options.opt_batch is not None and options.max_batch is not None
        graphs = self.graph_specs(model, layout, options.opt_batch, options.max_batch)
        # the stored, unused parts (pooler, EVA final norm and CLIP head, logit scale) are not counted
        unused = ("bge_pooler.", "model_visual.logit_scale", "model_visual.visual.norm.", "model_visual.visual.head.")
        parameters = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(unused))
        return ExportedModel(
            model, tokenizer, graphs, VisualizedPreprocessor(tokenizer, layout, text_overflow="error"),
            embedding_dim=hidden, max_text_length=layout.max_text_length, parameters=int(parameters),
            recipe={"text_layout": layout.to_json(), "pooling": "CLS, L2-normalized", "source": _SOURCE,
                    "image_only_prompt": "[CLS][SEP] (the tokenizer on \"\")"},
            details={"image_size": layout.image_size, "text_model_type": layout.text_model_type},
            summary=f"{parameters / 1e6:.1f}M parameters (EVA-CLIP patch {model.vision_config.patch_size}, "
                    f"{layout.text_model_type} text model), embedding dim {hidden}; texts up to "
                    f"{layout.multimodal_limit} tokens beside an image, {layout.text_only_limit} alone")

    def graph_modules(self, exported: ExportedModel) -> dict[str, torch.nn.Module]:
        from bgevl.families.visualized.modeling import graph_modules

        return graph_modules(cast("VisualizedBGE", exported.model))  # what prepare_export loaded

    def example_feeds(self, graphs: Mapping[str, GraphSpec], modules: Mapping[str, torch.nn.Module],
                      requests: Sequence[Feeds]) -> dict[str, Feeds]:
        """A composed request (two items or more): the text graph traced with the image tokens of the
        vision module (image-token count and sequence stay symbolic)."""
        import torch

        example = next(f for f in requests if PIXEL_VALUES in f and len(f[PIXEL_VALUES]) >= 2
                       and f[INPUT_IDS].shape[1] > 2)
        with torch.inference_mode():
            tokens = modules[VISION_GRAPH](torch.from_numpy(example[PIXEL_VALUES][:2])).numpy()
        return {VISION_GRAPH: {PIXEL_VALUES: example[PIXEL_VALUES][:2]},
                TEXT_GRAPH: {INPUT_IDS: example[INPUT_IDS][:2], ATTENTION_MASK: example[ATTENTION_MASK][:2],
                             IMAGE_TOKENS: tokens}}

    def validation_requests(self, probes: ProbeSet) -> list[Request]:
        return [Request(images=list(probes.images)), Request(texts=list(probes.texts)),
                Request(images=probes.composed_images(), texts=probes.composed_texts())]

    def fp16_keep_float32(self, graph: GraphSpec, model: onnx.ModelProto) -> dict[str, list[str]]:
        """EVA-02's 2D rotary: the products with the stored cos/sin tables and their sum stay float32, the
        tables with them (plain elementwise ops; TensorRT users report trouble with EVA-02's rotary in fp16)."""
        tables = {init.name for init in model.graph.initializer if ".rope.freqs_" in init.name}
        products = [n for n in model.graph.node if n.op_type == "Mul" and tables.intersection(n.input)]
        outputs = {o for n in products for o in n.output}
        sums = [n for n in model.graph.node if n.op_type == "Add" and outputs.issuperset(n.input)]
        return {"2D rotary (cos/sin tables)": [n.name for n in products + sums]} if products else {}

    # --- the embedding recipe ----------------------------------------------------------
    def steps(self, feeds: Feeds, graphs: Mapping[str, GraphSpec]) -> Steps:
        """Images (alone or with texts): the vision graph, then the text graph on the tokens (the empty prompt
        for images alone); texts alone: the text graph with no image tokens (FE ``encode_text``)."""
        if PIXEL_VALUES in feeds:
            (vision,) = yield [Call(VISION_GRAPH, {PIXEL_VALUES: feeds[PIXEL_VALUES]}, (IMAGE_TOKENS,))]
            tokens = np.asarray(vision[IMAGE_TOKENS], np.float32)
        else:
            hidden = graphs[TEXT_GRAPH].input(IMAGE_TOKENS).shape[-1]
            assert isinstance(hidden, int)  # a fixed axis (visualized_graph_specs)
            tokens = np.zeros((len(feeds[INPUT_IDS]), 0, hidden), np.float32)
        text = {INPUT_IDS: feeds[INPUT_IDS], ATTENTION_MASK: feeds[ATTENTION_MASK], IMAGE_TOKENS: tokens}
        (out,) = yield [Call(TEXT_GRAPH, text, (EMBEDDING,))]
        return out[EMBEDDING]

    def open_preprocessor(self, processor_dir: Path, recipe: Mapping[str, Any], max_text_length: int,
                          limits: InputLimits, text_overflow: str = "error", **options: Any) -> Preprocessor:
        """``text_overflow``: ``"error"`` (default) refuses a text over the position limit, ``"truncate"`` cuts
        it with a warning."""
        from bgevl.families.visualized.preprocessing import TextLayout, VisualizedPreprocessor

        if options:
            raise TypeError(f"unexpected options for a Visualized-BGE export: {', '.join(options)}")
        return VisualizedPreprocessor.from_pretrained(processor_dir, TextLayout.from_json(recipe["text_layout"]),
                                                      text_overflow, limits)

    # --- Triton ------------------------------------------------------------------------
    def write_triton_models(self, writer: TritonModels) -> None:
        """``<name>_preprocess`` (one request per execution: token lengths differ between requests),
        ``<name>_vision``, ``<name>_text`` and the entry ``<name>``."""
        from bgevl.core.specs import TensorSpec

        vision = writer.manifest.graph_spec(VISION_GRAPH)
        graph_models = {VISION_GRAPH: writer.encoder(VISION_GRAPH), TEXT_GRAPH: writer.encoder(TEXT_GRAPH)}
        matrix = (-1, -1)
        pre = writer.preprocess(
            [TensorSpec(SERVING_IMAGE, "bytes", (-1,)), TensorSpec(SERVING_TEXT, "bytes", (-1,))],
            [TensorSpec(PIXEL_VALUES, "float32", (-1, *vision.inputs[0].shape[1:])),
             TensorSpec(INPUT_IDS, "int64", matrix), TensorSpec(ATTENTION_MASK, "int64", matrix)],
            writer.batching(0, instances=writer.preprocess_instances), options={"text_overflow": "error"})
        writer.entry(writer.batching(vision.batch), graph_models, pre)

    def preprocess_outputs(self, present: set[str]) -> list[str]:
        return ([PIXEL_VALUES] if SERVING_IMAGE in present else []) + [INPUT_IDS, ATTENTION_MASK]

    def serving_preprocess_inputs(self, inputs: dict[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
        """IMAGE and TEXT ([batch, 1]) as one value per item."""
        return {name: values.reshape(-1) for name, values in inputs.items()}

    # --- benchmarks --------------------------------------------------------------------
    def bench_request(self, workload: str, images: list[Any] | None, texts: list[Any] | None) -> Request:
        return Request(images=images, texts=texts)

    def torch_baseline(self, checkpoint: Path, threads: int) -> TorchBaseline:
        from bgevl.runtime.baseline import GraphModulesBaseline

        return GraphModulesBaseline(self, checkpoint, threads)


