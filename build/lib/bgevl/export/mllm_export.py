"""Export of BGE-VL-MLLM (LLaVA-NeXT) embedders: two graphs, precision passes, parity with transformers.

Called by ``bgevl.export.pipeline.run_export`` for models of family ``mllm``. The graphs are
declared in ``bgevl.specs.mllm_graph_specs`` and defined in ``bgevl.export.mllm_modules``.

Precisions:

* fp32: as exported. Refused above ``FP32_LIMIT_BILLIONS`` parameters unless ``--force-fp32``.
* fp16: onnxconverter_common with float32 graph inputs/outputs; LayerNorm, Softmax, every
  RMSNorm (found by structure) and the final L2 normalization kept in float32.
* int8: weight-only (activations stay float): ``qdq`` writes int8 weights + DequantizeLinear
  (TensorRT weight-only INT8, ONNX Runtime), ``dynamic`` ONNX Runtime's MatMulNBits (8 bits). Not
  static activation quantization: the activations of 7B decoders carry outlier channels that
  per-tensor int8 ranges cannot hold (LLM.int8(), SmoothQuant), so W8A8 from a MinMax calibration
  costs far more accuracy than weight-only int8.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

import numpy as np

from bgevl.errors import BgevlError
from bgevl.specs import (
    FP32_LIMIT_BILLIONS, IMAGE_TILES, MLLM_LANGUAGE_GRAPH, MLLM_VISION_GRAPH,
    ONNX_OPSET, TILE_FEATURES, GraphSpec, ModelSpec, graph_specs_to_json, mllm_graph_specs_from_config,
)

#: Items per validation batch: mixed image-only, text-only and composed items in each batch.
VALIDATION_BATCH = 4


def check_mllm_options(spec: ModelSpec, opts: Any) -> None:
    if opts.precision == "fp32" and spec.billions > FP32_LIMIT_BILLIONS and not opts.force_fp32:
        raise BgevlError(
            f"--precision fp32 for {spec.key} ({spec.billions:.2f}B parameters) needs about "
            f"{spec.billions * 4:.0f} GB for the weights alone and about twice that while exporting; "
            f"fp16 is the production precision of this model. Use --precision fp16 (or int8), or pass "
            f"--force-fp32 on a machine with the memory for it."
        )
    if opts.calibration_data is not None:
        raise BgevlError("--calibration-data does not apply to the MLLM: its int8 is weight-only and needs no calibration")


def validation_items(probes: Any) -> list[tuple[Any, str | None, str]]:
    """(image or None, text or None, role) per item: image-only candidates, text-only candidates,
    composed queries and text-only queries, interleaved so every batch is mixed."""
    n = len(probes.images)
    items = []
    for i in range(n):
        items.append((probes.images[i], None, "candidate"))
        items.append((None, probes.texts[i], "candidate"))
        img, txt = probes.composed[i]
        items.append((probes.images[img], probes.texts[txt], "query"))
        items.append((None, probes.texts[(i + 2) % n], "query"))
    return items


def export_mllm(spec: ModelSpec, opts: Any, staging: Path, work: Path, progress: Any) -> dict:
    import torch

    from bgevl.checkpoints import load_mllm, resolve_checkpoint
    from bgevl.export import onnx_tools
    from bgevl.export.mllm_modules import graph_modules
    from bgevl.export.pipeline import _versions, convert_graph
    from bgevl.export.validate import (
        VALIDATION_ARRAYS, check_thresholds, format_figures, mllm_parity, mllm_reference_arrays, save_arrays, threshold_for,
    )
    from bgevl.probes import probe_set
    from bgevl.reference import OriginalLlavaEmbedder
    from bgevl.runtime.mllm_preprocessing import BGEVL_IMAGE_RESIZE, CIR_INSTRUCTION, ImageLayout, MllmPreprocessor
    from bgevl.runtime.providers import create_session

    check_mllm_options(spec, opts)
    source = "--model-path" if opts.model_path else ("generated" if spec.generated or opts.random_weights else "hub")
    progress(f"loading {spec.key} ({source})")
    ckpt = resolve_checkpoint(spec, model_path=opts.model_path, random_weights=opts.random_weights, workdir=work)
    model, processor = load_mllm(ckpt.path, spec=spec)
    config = model.config
    layout = ImageLayout.from_config(config)
    graphs: dict[str, GraphSpec] = mllm_graph_specs_from_config(
        config, opt_batch=opts.opt_batch, max_batch=opts.max_batch, max_sequence=opts.max_sequence_length)
    hidden = int(config.text_config.hidden_size)
    n_params = sum(p.numel() for p in model.parameters()) - model.lm_head.weight.numel()
    progress.info(f"{ckpt.source}; {n_params / 1e6:.1f}M parameters without the LM head, embedding dim {hidden}, "
                  f"tokenizer padding side {processor.tokenizer.padding_side}")

    # Validation preprocesses as the runtime does by default (BGE-VL's 512x512 resize before the RGB
    # conversion); tests/test_mllm.py covers the anyres grids of images at their own sizes.
    pre = MllmPreprocessor(processor, layout, opts.max_sequence_length)
    probes = probe_set(opts.probe_count)
    items = validation_items(probes)
    batches = [items[i:i + VALIDATION_BATCH] for i in range(0, len(items), VALIDATION_BATCH)]

    def preprocess(batch):
        feeds = []
        for role in ("candidate", "query"):
            part = [it for it in batch if it[2] == role]
            if part:
                images = [it[0] for it in part] if any(it[0] is not None for it in part) else None
                texts = [it[1] for it in part] if any(it[1] is not None for it in part) else None
                feeds.append((part, pre(images, texts, role, CIR_INSTRUCTION if role == "query" else None)))
        return feeds

    prepared = [f for batch in batches for f in preprocess(batch)]
    modules = graph_modules(model)

    progress(f"exporting {len(graphs)} graphs to ONNX (opset {ONNX_OPSET}, fp32)")
    fp32_dir = work / "fp32"
    fp32_dir.mkdir()
    example = next(feed for _, feed in prepared if IMAGE_TILES in feed and len(feed[IMAGE_TILES]) >= 2
                   and len(feed["input_ids"]) >= 2)
    onnx_tools.export_torch_graph(modules[MLLM_VISION_GRAPH], graphs[MLLM_VISION_GRAPH],
                                  {IMAGE_TILES: example[IMAGE_TILES]}, fp32_dir / graphs[MLLM_VISION_GRAPH].filename)
    with torch.inference_mode():
        tile_features = modules[MLLM_VISION_GRAPH](torch.from_numpy(example[IMAGE_TILES])).numpy()
    language_example = {k: v for k, v in example.items() if k != IMAGE_TILES}
    language_example[TILE_FEATURES] = tile_features
    onnx_tools.export_torch_graph(modules[MLLM_LANGUAGE_GRAPH], graphs[MLLM_LANGUAGE_GRAPH], language_example,
                                  fp32_dir / graphs[MLLM_LANGUAGE_GRAPH].filename)
    for g in graphs.values():
        progress.info(f"{g.filename}: {onnx_tools.file_size(fp32_dir / g.filename) / 1e6:.1f} MB")

    progress(f"converting to {opts.precision}" + (f" (weight-only, {opts.int8_mode})" if opts.precision == "int8" else ""))
    precision_details: dict[str, dict] = {}
    for name, gspec in graphs.items():
        src, dst = fp32_dir / gspec.filename, staging / gspec.filename
        precision_details[name] = convert_graph(
            name, src, dst, opts.precision, int8=lambda: onnx_tools.quantize_weights_int8(src, dst, opts.int8_mode))

    del modules, model  # the reference below is loaded on its own; do not hold two copies
    validation: dict = {"performed": False}
    figures: dict[str, dict] = {}
    if opts.validate:
        progress(f"validating against the original's fp32 embeddings on {len(items)} items (image-only, text-only, "
                 f"composed; queries and candidates; images {', '.join(sorted({im.mode for im in probes.images}))})")
        original = OriginalLlavaEmbedder(ckpt.path)
        parts, ref_parts, kinds = [], [], []
        for part, feeds in prepared:
            ref_parts.append(original.encode(part, CIR_INSTRUCTION))
            parts.append(feeds)
            kinds += [("image" if it[1] is None else "text" if it[0] is None else "composed") for it in part]
        del original
        arrays = mllm_reference_arrays(parts, np.concatenate(ref_parts), kinds, (1, layout.tile_tokens, hidden))
        sessions = {name: create_session(staging / g.filename) for name, g in graphs.items()}
        figures.update(mllm_parity(arrays, lambda name, feed, outs: sessions[name].run(list(outs), dict(feed))))
        save_arrays(staging / VALIDATION_ARRAYS, arrays)
        progress.info("parity vs the original's fp32 embeddings (ONNX Runtime CPU):\n" + format_figures(figures))
        threshold = threshold_for(opts.precision, opts.min_cosine)
        validation = {
            "performed": True,
            "reference": OriginalLlavaEmbedder.DESCRIPTION,
            "runtime": "onnxruntime CPUExecutionProvider",
            "probe_set": {**probes.describe(), "items": len(items), "batch": VALIDATION_BATCH,
                          "image_resize": f"{BGEVL_IMAGE_RESIZE[0]}x{BGEVL_IMAGE_RESIZE[1]} before RGB, as the original"},
            "arrays": VALIDATION_ARRAYS,
            **check_thresholds(figures, opts.precision, threshold, ckpt.weights),
        }
    else:
        progress("validation skipped (--no-validate)")

    progress("writing processor files and manifest")
    processor.save_pretrained(staging / "processor")
    graph_json = graph_specs_to_json(graphs)
    for name in graphs:
        graph_json[name].update(
            precision=opts.precision, opset=ONNX_OPSET, source_checkpoint=ckpt.source,
            bytes=onnx_tools.file_size(staging / graphs[name].filename), precision_details=precision_details[name],
        )
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "key": spec.key, "family": spec.family, "description": spec.description, "source": ckpt.source,
            "weights": ckpt.weights, "embedding_dim": hidden, "max_text_length": int(opts.max_sequence_length),
            "parameters_without_lm_head": int(n_params),
        },
        "mllm": {
            "image_layout": layout.to_json(),
            "image_resize": list(BGEVL_IMAGE_RESIZE),
            "padding_side": processor.tokenizer.padding_side,
            "default_query_instruction": CIR_INSTRUCTION,
            "prompt_source": "VectorSpaceLab/MegaPairs LLaVANextForEmbedding.prepare_text_input",
        },
        "precision": opts.precision,
        "int8_mode": opts.int8_mode if opts.precision == "int8" else None,
        "calibration": None,
        "opset": ONNX_OPSET,
        "processor_dir": "processor",
        "graphs": graph_json,
        "validation": {**validation, "figures": figures} if figures else validation,
        "versions": _versions(),
        "command": opts.command,
    }
