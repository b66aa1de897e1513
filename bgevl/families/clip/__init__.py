"""The CLIP family: BGE-VL-base / -large, CLIP dual encoders; a composed query is score fusion.

Files: ``graphs`` (graph declarations), ``checkpoint`` (generator and checked loader), ``modules``
(the torch modules exported), ``reference`` (the original's fp32 embeddings), ``preprocessing``
(CLIPProcessor with BGE-VL's rules), ``fusion`` (score fusion), ``triton_fusion`` (the Triton
fusion model of the ``<name>_composed`` ensemble), ``bench`` (the PyTorch baseline).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from bgevl.checkpoints import HubCheckpoints
from bgevl.core.family import (
    Call, CheckpointKind, ExportedModel, Family, Feeds, Int8Form, Request, Steps,
)
from bgevl.families.clip.graphs import (
    IMAGE_EMBEDS, IMAGE_FEATURES, TEXT_EMBEDS, TEXT_FEATURES, TEXT_GRAPH, VISION_GRAPH, clip_graph_specs_from_config,
)
from bgevl.core.specs import (
    ATTENTION_MASK, DEFAULT_MAX_BATCH, DEFAULT_OPT_BATCH, INPUT_IDS, PIXEL_VALUES, SERVING_IMAGE, SERVING_TEXT,
    GraphSpec, ModelSpec,
)

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



MODELS = (

    ModelSpec(
        "tiny", "clip",
        "small random-weight CLIP (same architecture as BGE-VL-base, 2 layers, width 32), generated offline",
        architecture=_clip_arch(text_width=32, text_layers=2, text_heads=2, vision_width=32,
                                vision_layers=2, vision_heads=2, patch=32, image_size=224, proj=16,
                                vocab_size=0),  # vocab size comes from the generated tokenizer
    ),
    ModelSpec(
        "base", "clip", "BAAI/BGE-VL-base: CLIP ViT-B/16 dual encoder (150M parameters)",
        hub_id="BAAI/BGE-VL-base",
        architecture=_clip_arch(text_width=512, text_layers=12, text_heads=8, vision_width=768,
                                vision_layers=12, vision_heads=12, patch=16, image_size=224, proj=512),
    ),
    ModelSpec(
        "large", "clip", "BAAI/BGE-VL-large: CLIP ViT-L/14 dual encoder (428M parameters)",
        hub_id="BAAI/BGE-VL-large",
        architecture=_clip_arch(text_width=768, text_layers=12, text_heads=12, vision_width=1024,
                                vision_layers=24, vision_heads=16, patch=14, image_size=224, proj=768),
    ),
)

#: The manifest's recipe section of every CLIP export.
SCORE_FUSION = {"composed": "score fusion", "formula": f"l2_normalize({IMAGE_FEATURES} + {TEXT_FEATURES})"}


class ClipFamily(HubCheckpoints, Family):
    name = "clip"
    description = "CLIP dual encoders (BGE-VL-base, BGE-VL-large); composed queries by score fusion"
    models = MODELS
    default_batch = (DEFAULT_OPT_BATCH, DEFAULT_MAX_BATCH)
    supports_fp8 = True  # static FP8 Q/DQ on the towers' weight GEMMs, calibrated like the static int8 form
    checkpoint_kind = CheckpointKind(
        "clip", "CLIP dual encoder (CLIPModel)", "CLIPConfig",
        (("tokenizer.json",), ("vocab.json", "merges.txt")),
        ("vision_config.hidden_size", "vision_config.num_hidden_layers", "vision_config.patch_size",
         "vision_config.image_size", "text_config.hidden_size", "text_config.num_hidden_layers", "projection_dim"),
    )
    serving_inputs = (SERVING_IMAGE, SERVING_TEXT)

    # --- checkpoints -------------------------------------------------------------------
    def generate_checkpoint(self, spec: ModelSpec, directory: Path) -> Path:
        from bgevl.families.clip.checkpoint import generate_clip_checkpoint

        return generate_clip_checkpoint(spec, directory)

    def load(self, path: Path, spec: ModelSpec | None = None, attn_implementation: str = "eager") -> tuple[Any, Any]:
        from bgevl.families.clip.checkpoint import load_clip

        return load_clip(path, attn_implementation, spec)

    def original(self, path: Path):
        from bgevl.families.clip.reference import OriginalClip

        return OriginalClip(path)

    # --- export ------------------------------------------------------------------------
    def prepare_export(self, path: Path, spec: ModelSpec, options: Any) -> ExportedModel:
        from bgevl.families.clip.preprocessing import ClipPreprocessor

        model, processor = self.load(path, spec)
        config = model.config
        graphs = clip_graph_specs_from_config(config, opt_batch=options.opt_batch, max_batch=options.max_batch)
        max_len = int(config.text_config.max_position_embeddings)
        parameters = sum(p.numel() for p in model.parameters())
        return ExportedModel(
            model, processor, graphs, ClipPreprocessor(processor, max_len, text_overflow="truncate"),
            embedding_dim=int(config.projection_dim), max_text_length=max_len, parameters=parameters,
            recipe=dict(SCORE_FUSION), details={"image_size": int(config.vision_config.image_size)},
            summary=f"{parameters / 1e6:.1f}M parameters, embedding dim {config.projection_dim}")

    def graph_modules(self, exported: ExportedModel) -> dict[str, Any]:
        from bgevl.families.clip.modules import graph_modules

        return graph_modules(exported.model)

    def example_feeds(self, modules: Mapping[str, Any], requests: Sequence[Feeds]) -> dict[str, Feeds]:
        out: dict[str, Feeds] = {}
        for feeds in requests:
            if PIXEL_VALUES in feeds:
                out.setdefault(VISION_GRAPH, {PIXEL_VALUES: feeds[PIXEL_VALUES][:2]})
            if INPUT_IDS in feeds:
                out.setdefault(TEXT_GRAPH, {k: feeds[k][:2] for k in (INPUT_IDS, ATTENTION_MASK)})
        return out

    def validation_requests(self, probes: Any) -> list[Request]:
        return [Request(images=list(probes.images)), Request(texts=list(probes.texts)),
                Request(images=probes.composed_images(), texts=probes.composed_texts())]

    def int8_form(self, mode: str) -> Int8Form:
        if mode == "dynamic":
            return Int8Form("dynamic", "ONNX Runtime dynamic quantization (int8 weights, activations quantized at run "
                            "time; CPU only)", calibrated=False)
        if mode == "qdq-u8":
            return Int8Form("static-qdq-u8", "static QuantizeLinear/DequantizeLinear with uint8 activations and int8 "
                            "per-channel weights from a calibration set (the CPU form: ONNX Runtime CPU and OpenVINO run "
                            "every quantized MatMul in int8; not for TensorRT)", calibrated=True)
        return Int8Form("static-qdq", "static QuantizeLinear/DequantizeLinear, int8 weights and activations from a "
                        "calibration set (TensorRT explicit quantization, ONNX Runtime)", calibrated=True)

    def quantize_int8(self, graph: GraphSpec, src: Path, dst: Path, mode: str,
                      calibration: Callable[[], list[Feeds]] | None) -> dict:
        from bgevl.graphs import onnx_passes

        feeds = calibration() if calibration is not None and self.int8_form(mode).calibrated else None
        return onnx_passes.quantize_int8(src, dst, mode, feeds, graph.normalized_output,
                                        lambda model: self.fp16_keep_float32(graph, model))

    def quantize_fp8(self, graph: GraphSpec, src: Path, dst: Path, calibration: Callable[[], list[Feeds]]) -> dict:
        from bgevl.graphs import onnx_passes

        return onnx_passes.quantize_fp8(src, dst, calibration(), graph.normalized_output,
                                       lambda model: self.fp16_keep_float32(graph, model))

    def calibration_feeds(self, preprocessor: Any, graph: GraphSpec, images: list, texts: list,
                          batch: int) -> list[Feeds]:
        if PIXEL_VALUES in graph.input_names:
            return [preprocessor.prepare(Request(images=images[i:i + batch]), i) for i in range(0, len(images), batch)]
        return [preprocessor.prepare(Request(texts=texts[i:i + batch]), i) for i in range(0, len(texts), batch)]

    # --- the embedding recipe ----------------------------------------------------------
    def steps(self, feeds: Feeds, graphs: Mapping[str, GraphSpec]) -> Steps:
        """Images -> ``image_embeds``; texts -> ``text_embeds``; both -> score fusion of the unnormalized
        features (BGE-VL's ``encode_multimodal``; ``bgevl.families.clip.fusion``)."""
        from bgevl.families.clip.fusion import score_fusion

        image = {PIXEL_VALUES: feeds[PIXEL_VALUES]} if PIXEL_VALUES in feeds else None
        text = {k: feeds[k] for k in (INPUT_IDS, ATTENTION_MASK)} if INPUT_IDS in feeds else None
        if image is not None and text is not None:
            image_out, text_out = yield [Call(VISION_GRAPH, image, (IMAGE_FEATURES,)),
                                         Call(TEXT_GRAPH, text, (TEXT_FEATURES,))]
            return score_fusion(image_out[IMAGE_FEATURES], text_out[TEXT_FEATURES])
        if image is not None:
            (out,) = yield [Call(VISION_GRAPH, image, (IMAGE_EMBEDS,))]
            return out[IMAGE_EMBEDS]
        (out,) = yield [Call(TEXT_GRAPH, text, (TEXT_EMBEDS,))]
        return out[TEXT_EMBEDS]

    def open_preprocessor(self, processor_dir: Path, recipe: Mapping[str, Any], max_text_length: int, limits: Any,
                          text_overflow: str = "truncate", **options: Any):
        """``text_overflow``: ``"truncate"`` (warn) or ``"error"`` for texts over the model's token limit."""
        from bgevl.families.clip.preprocessing import ClipPreprocessor

        if options:
            raise TypeError(f"unexpected options for a CLIP export: {', '.join(options)}")
        return ClipPreprocessor.from_pretrained(processor_dir, max_text_length, text_overflow, limits)

    # --- Triton ------------------------------------------------------------------------
    def write_triton_models(self, writer: Any) -> None:
        """``<name>_preprocess``, the two encoders, the entry ``<name>`` and, for composed queries in
        Triton's own form, ``<name>_fusion`` and the ensemble ``<name>_composed``."""
        from bgevl.core.specs import SERVING_EMBEDDING, TensorSpec
        from bgevl.serving.configs import Step, check_ensemble_wiring, ensemble_config, python_config

        vision = writer.manifest.graph_spec(VISION_GRAPH)
        batch = vision.batch
        dim, length = writer.manifest.model.embedding_dim, writer.manifest.model.max_text_length
        trim = ATTENTION_MASK if writer.right_padded() else None  # see bgevl/serving/models/onnx_encoder.py
        graph_models = {VISION_GRAPH: writer.encoder(VISION_GRAPH), TEXT_GRAPH: writer.encoder(TEXT_GRAPH, trim)}
        raw = [TensorSpec(SERVING_IMAGE, "bytes", (1,)), TensorSpec(SERVING_TEXT, "bytes", (1,))]
        pre = writer.preprocess(
            raw, [TensorSpec(PIXEL_VALUES, "float32", vision.inputs[0].shape[1:]),
                  TensorSpec(INPUT_IDS, "int64", (length,)), TensorSpec(ATTENTION_MASK, "int64", (length,))],
            writer.batching(batch, instances=writer.preprocess_instances), options={"text_overflow": "truncate"})

        features = [TensorSpec(IMAGE_FEATURES, "float32", (dim,)), TensorSpec(TEXT_FEATURES, "float32", (dim,))]
        embedding = TensorSpec(SERVING_EMBEDDING, "float32", (dim,))
        fusion = python_config(writer.model_name("fusion"), features, [embedding], writer.batching(batch))
        writer.write(fusion, "bgevl.families.clip.triton_fusion")
        writer.entry(writer.batching(batch), graph_models, pre)

        steps = [
            Step(pre, {SERVING_IMAGE: SERVING_IMAGE, SERVING_TEXT: SERVING_TEXT},
                 {PIXEL_VALUES: "pixel_values", INPUT_IDS: "input_ids", ATTENTION_MASK: "attention_mask"}),
            Step(graph_models[VISION_GRAPH], {PIXEL_VALUES: "pixel_values"}, {IMAGE_FEATURES: "image_features"}),
            Step(graph_models[TEXT_GRAPH], {INPUT_IDS: "input_ids", ATTENTION_MASK: "attention_mask"},
                 {TEXT_FEATURES: "text_features"}),
            Step(fusion.name, {IMAGE_FEATURES: "image_features", TEXT_FEATURES: "text_features"},
                 {SERVING_EMBEDDING: SERVING_EMBEDDING}),
        ]
        composed = ensemble_config(writer.model_name("composed"), raw, [embedding], steps, batch.max)
        check_ensemble_wiring(composed, writer.configs)
        writer.write(composed)

    def preprocess_outputs(self, present: set[str]) -> list[str]:
        return ([PIXEL_VALUES] if SERVING_IMAGE in present else []) + (
            [INPUT_IDS, ATTENTION_MASK] if SERVING_TEXT in present else [])

    # --- benchmarks --------------------------------------------------------------------
    def bench_request(self, workload: str, images: list | None, texts: list | None) -> Request:
        return Request(images=images, texts=texts)

    def torch_baseline(self, checkpoint: Path, threads: int) -> Any:
        from bgevl.families.clip.bench import ClipBaseline

        return ClipBaseline(self, checkpoint, threads)


