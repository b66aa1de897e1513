"""The dual-encoder base: an image tower and a text tower into one space (CLIP, SigLIP and their kin),
composed image+text queries by BGE-VL's score fusion where the family declares them.

A family of this shape is a subclass that declares what its model is and overrides a few hooks:

* declarations: ``model_class`` (the transformers class, e.g. ``"CLIPModel"``, ``"SiglipModel"``),
  ``checkpoint_kind``, ``models``, ``text_padding`` (how texts are padded and whether the text graph takes
  a mask: the runtime's preprocessor, the graph declaration and the Triton text encoder all follow it),
  ``kinds`` (without ``COMPOSED``: no score fusion, no composed ensemble);
* hooks: :meth:`tower_shapes` (the graphs' shapes from the checkpoint's config), ``generate_checkpoint``
  (an offline random-weight checkpoint in the hub layout), and, where the model's ``get_image_features``
  / ``get_text_features`` are not what the graphs should compute, :meth:`tower_modules`.

Everything else (checked loading, the graphs, example and validation feeds, the precision forms, the
recipe, the independent fp32 reference, the Triton models, the PyTorch baseline) is derived here from
those declarations. Files: ``graphs`` (graph declarations), ``modules`` (the torch modules exported),
``preprocessing`` (the checkpoint's processor with the declared padding), ``reference`` (the original's
fp32 embeddings), ``fusion`` (score fusion) and ``triton_fusion`` (its Triton model).
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from bgevl.checkpoints import HubCheckpoints
from bgevl.core.family import (
    COMPOSED, IMAGE, TEXT, Call, ExportedModel, Family, Feeds, Int8Form, Original, Preprocessor, Request, Steps,
    TorchBaseline, TritonModels,
)
from bgevl.core.specs import (
    DEFAULT_MAX_BATCH, DEFAULT_OPT_BATCH, PIXEL_VALUES, SERVING_IMAGE, SERVING_TEXT, GraphSpec, ModelSpec, TensorSpec,
    TextPadding,
)
from bgevl.families.dual_encoder.graphs import (
    IMAGE_EMBEDS, IMAGE_FEATURES, TEXT_EMBEDS, TEXT_FEATURES, TEXT_GRAPH, VISION_GRAPH, TowerShapes,
    dual_encoder_graph_specs,
)

if TYPE_CHECKING:  # pragma: no cover  (types only)
    import torch

    from bgevl.core.options import ExportOptions
    from bgevl.core.preprocessing import InputLimits
    from bgevl.core.probes import ProbeSet

#: The manifest's recipe section of an export with composed queries.
SCORE_FUSION = {"composed": "score fusion", "formula": f"l2_normalize({IMAGE_FEATURES} + {TEXT_FEATURES})"}


class DualEncoderFamily(HubCheckpoints, Family):
    """Base of the dual-encoder families (see the module's docstring for what a subclass declares)."""

    #: the transformers model class of the checkpoint (``config.json``'s architecture)
    model_class: ClassVar[str]
    #: how the text tower's inputs are padded (CLIP: to the longest, with a mask)
    text_padding: ClassVar[TextPadding] = TextPadding()
    default_batch = (DEFAULT_OPT_BATCH, DEFAULT_MAX_BATCH)
    supports_fp8 = True  # static FP8 Q/DQ on the towers' weight GEMMs, calibrated like the static int8 form
    serving_inputs = (SERVING_IMAGE, SERVING_TEXT)
    int8_forms = (
        Int8Form("static-qdq", "static QuantizeLinear/DequantizeLinear, int8 weights and activations from a "
                 "calibration set (TensorRT explicit quantization, ONNX Runtime)", calibrated=True, mode="qdq"),
        Int8Form("static-qdq-u8", "static QuantizeLinear/DequantizeLinear with uint8 activations and int8 per-channel "
                 "weights from a calibration set (the CPU form: ONNX Runtime CPU and OpenVINO run every quantized "
                 "MatMul in int8; not for TensorRT)", calibrated=True, mode="qdq-u8"),
        Int8Form("dynamic", "ONNX Runtime dynamic quantization (int8 weights, activations quantized at run time; CPU "
                 "only)", calibrated=False, mode="dynamic"),
    )

    # --- hooks -------------------------------------------------------------------------
    @abstractmethod
    def tower_shapes(self, config: Any) -> TowerShapes:
        """The graphs' shapes (image size, text length, embedding width, vocabulary) from the checkpoint's config."""

    def tower_modules(self, model: Any) -> dict[str, torch.nn.Module]:
        """The torch modules of the two graphs (inputs and outputs as ``bgevl.families.dual_encoder.graphs``
        declares them). Default: the model's own ``get_image_features`` / ``get_text_features``, L2-normalized."""
        from bgevl.families.dual_encoder.modules import dual_encoder_modules

        return dual_encoder_modules(model, self.text_padding)

    @property
    def composed(self) -> bool:
        return COMPOSED in self.kinds

    # --- checkpoints -------------------------------------------------------------------
    def load(self, path: Path, spec: ModelSpec | None = None, attn_implementation: str = "eager") -> tuple[Any, Any]:
        """The checked float32 model (``model_class``) and its processor; ``spec`` defaults to the family's
        generated model (any size of the family)."""
        import transformers

        from bgevl.checkpoints import any_size_spec, check_tokenizer, inspect_checkpoint, load_weights_checked
        from bgevl.core.preprocessing import load_processor

        files = inspect_checkpoint(Path(path), spec or any_size_spec(self))
        model = load_weights_checked(getattr(transformers, self.model_class), Path(path), files.config, attn_implementation)
        processor = load_processor(path)
        check_tokenizer(processor.tokenizer, Path(path))
        return model, processor

    def original(self, path: Path, recipe: Mapping[str, Any] | None = None) -> Original:
        from bgevl.families.dual_encoder.reference import OriginalDualEncoder

        return OriginalDualEncoder(path, self.model_class, self.text_padding, fusion=self.composed)

    # --- export ------------------------------------------------------------------------
    def prepare_export(self, path: Path, spec: ModelSpec, options: ExportOptions) -> ExportedModel:
        from bgevl.families.dual_encoder.preprocessing import DualEncoderPreprocessor

        model, processor = self.load(path, spec, options.attn_implementation)
        shapes = self.tower_shapes(model.config)
        # the export driver resolves the batch range (None: the family default) before prepare_export
        assert options.opt_batch is not None and options.max_batch is not None
        graphs = dual_encoder_graph_specs(shapes, self.text_padding, opt_batch=options.opt_batch, max_batch=options.max_batch)
        parameters = sum(p.numel() for p in model.parameters())
        preprocessor = DualEncoderPreprocessor(processor, shapes.max_text_length, "truncate", text=self.text_padding)
        return ExportedModel(
            model, processor, graphs, preprocessor, embedding_dim=shapes.embed_dim,
            max_text_length=shapes.max_text_length, parameters=parameters,
            recipe=dict(SCORE_FUSION) if self.composed else {}, details={"image_size": shapes.image_size},
            summary=f"{parameters / 1e6:.1f}M parameters, embedding dim {shapes.embed_dim}")

    def graph_modules(self, exported: ExportedModel) -> dict[str, torch.nn.Module]:
        return self.tower_modules(exported.model)

    def validation_requests(self, probes: ProbeSet) -> list[Request]:
        requests = [Request(images=list(probes.images)), Request(texts=list(probes.texts))]
        if self.composed:
            requests.append(Request(images=probes.composed_images(), texts=probes.composed_texts()))
        return requests

    def calibration_feeds(self, preprocessor: Preprocessor, graph: GraphSpec, images: list[Any], texts: list[Any],
                          batch: int) -> list[Feeds]:
        if PIXEL_VALUES in graph.input_names:
            return [preprocessor.prepare(Request(images=images[i:i + batch]), i) for i in range(0, len(images), batch)]
        return [preprocessor.prepare(Request(texts=texts[i:i + batch]), i) for i in range(0, len(texts), batch)]

    # --- the embedding recipe ----------------------------------------------------------
    def steps(self, feeds: Feeds, graphs: Mapping[str, GraphSpec]) -> Steps:
        """Images -> ``image_embeds``; texts -> ``text_embeds``; both -> score fusion of the unnormalized
        features (BGE-VL's ``encode_multimodal``; ``bgevl.families.dual_encoder.fusion``). The graphs'
        inputs are read from their declarations."""
        from bgevl.families.dual_encoder.fusion import score_fusion

        def feed_of(graph: str) -> dict[str, Any] | None:
            names = graphs[graph].input_names
            return {k: feeds[k] for k in names} if names[0] in feeds else None

        image, text = feed_of(VISION_GRAPH), feed_of(TEXT_GRAPH)
        if image is not None and text is not None:
            image_out, text_out = yield [Call(VISION_GRAPH, image, (IMAGE_FEATURES,)),
                                         Call(TEXT_GRAPH, text, (TEXT_FEATURES,))]
            return score_fusion(image_out[IMAGE_FEATURES], text_out[TEXT_FEATURES])
        if image is not None:
            (out,) = yield [Call(VISION_GRAPH, image, (IMAGE_EMBEDS,))]
            return out[IMAGE_EMBEDS]
        (out,) = yield [Call(TEXT_GRAPH, text or {}, (TEXT_EMBEDS,))]
        return out[TEXT_EMBEDS]

    def open_preprocessor(self, processor_dir: Path, recipe: Mapping[str, Any], max_text_length: int,
                          limits: InputLimits, text_overflow: str = "truncate", **options: Any) -> Preprocessor:
        """``text_overflow``: ``"truncate"`` (warn) or ``"error"`` for texts over the model's token limit."""
        from bgevl.families.dual_encoder.preprocessing import DualEncoderPreprocessor

        if options:
            raise TypeError(f"unexpected options for a {self.name} export: {', '.join(options)}")
        return DualEncoderPreprocessor.from_pretrained(processor_dir, max_text_length, text_overflow, limits,
                                                       self.text_padding)

    # --- Triton ------------------------------------------------------------------------
    def write_triton_models(self, writer: TritonModels) -> None:
        """``<name>_preprocess``, the two encoders, the entry ``<name>`` and, for composed queries in
        Triton's own form, ``<name>_fusion`` and the ensemble ``<name>_composed``."""
        from bgevl.core.specs import TensorSpec

        vision, text = writer.manifest.graph_spec(VISION_GRAPH), writer.manifest.graph_spec(TEXT_GRAPH)
        length = writer.manifest.model.max_text_length
        # a merged batch's common right padding is cut only where the model allows it (see
        # bgevl/serving/models/onnx_encoder.py): masked, padded to the longest, and padded on the right
        trim = self.text_padding.input_names[-1] if self.text_padding.trimmable and writer.right_padded() else None
        graph_models = {VISION_GRAPH: writer.encoder(VISION_GRAPH), TEXT_GRAPH: writer.encoder(TEXT_GRAPH, trim)}
        raw = [TensorSpec(SERVING_IMAGE, "bytes", (1,)), TensorSpec(SERVING_TEXT, "bytes", (1,))]
        prepared = [TensorSpec(PIXEL_VALUES, "float32", vision.inputs[0].shape[1:])] + [
            TensorSpec(t.name, t.dtype, (length,)) for t in text.inputs]
        pre = writer.preprocess(raw, prepared, writer.batching(vision.batch, instances=writer.preprocess_instances),
                                options={"text_overflow": "truncate"})
        writer.entry(writer.batching(vision.batch), graph_models, pre)
        if self.composed:
            self._write_composed_ensemble(writer, raw, pre, graph_models)

    def _write_composed_ensemble(self, writer: TritonModels, raw: list[TensorSpec], pre: str,
                                 graph_models: dict[str, str]) -> None:
        """``<name>_fusion`` (score fusion) and the ensemble ``<name>_composed``: preprocess -> both encoders -> fusion."""
        from bgevl.core.specs import SERVING_EMBEDDING, TensorSpec
        from bgevl.serving.configs import Step, check_ensemble_wiring, ensemble_config, python_config

        batch = writer.manifest.graph_spec(VISION_GRAPH).batch
        dim = writer.manifest.model.embedding_dim
        features = [TensorSpec(IMAGE_FEATURES, "float32", (dim,)), TensorSpec(TEXT_FEATURES, "float32", (dim,))]
        embedding = TensorSpec(SERVING_EMBEDDING, "float32", (dim,))
        fusion = python_config(writer.model_name("fusion"), features, [embedding], writer.batching(batch))
        writer.write(fusion, "bgevl.families.dual_encoder.triton_fusion")
        text_inputs = {name: name for name in self.text_padding.input_names}
        steps = [
            Step(pre, {SERVING_IMAGE: SERVING_IMAGE, SERVING_TEXT: SERVING_TEXT}, {PIXEL_VALUES: PIXEL_VALUES, **text_inputs}),
            Step(graph_models[VISION_GRAPH], {PIXEL_VALUES: PIXEL_VALUES}, {IMAGE_FEATURES: IMAGE_FEATURES}),
            Step(graph_models[TEXT_GRAPH], text_inputs, {TEXT_FEATURES: TEXT_FEATURES}),
            Step(fusion.name, {IMAGE_FEATURES: IMAGE_FEATURES, TEXT_FEATURES: TEXT_FEATURES},
                 {SERVING_EMBEDDING: SERVING_EMBEDDING}),
        ]
        composed = ensemble_config(writer.model_name("composed"), raw, [embedding], steps, batch.max)
        check_ensemble_wiring(composed, writer.configs)
        writer.write(composed)

    def preprocess_outputs(self, present: set[str]) -> list[str]:
        return ([PIXEL_VALUES] if SERVING_IMAGE in present else []) + (
            list(self.text_padding.input_names) if SERVING_TEXT in present else [])

    # --- benchmarks --------------------------------------------------------------------
    def bench_request(self, workload: str, images: list[Any] | None, texts: list[Any] | None) -> Request:
        return Request(images=images if workload != TEXT else None, texts=texts if workload != IMAGE else None)

    def torch_baseline(self, checkpoint: Path, threads: int) -> TorchBaseline:
        from bgevl.runtime.baseline import GraphModulesBaseline

        return GraphModulesBaseline(self, checkpoint, threads)
