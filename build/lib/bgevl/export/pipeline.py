"""The export job behind ``bgevl-export``: checkpoint -> ONNX graphs -> precision -> validation -> manifest.

Everything is written into a staging directory next to the output and moved into place only
when the whole job (validation included) has succeeded, so a failure leaves nothing
half-written.
"""

from __future__ import annotations

import datetime as _dt
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from bgevl import __version__
from bgevl.checkpoints import load_clip, resolve_checkpoint
from bgevl.errors import BgevlError
from bgevl.manifest import MANIFEST_NAME, write_manifest
from bgevl.staging import check_replaceable, staged_directory
from bgevl.probes import builtin_calibration_set, probe_set
from bgevl.runtime.preprocessing import ClipPreprocessor, load_image
from bgevl.runtime.providers import create_session
from bgevl.specs import (
    IMAGE_FEATURES, NORMALIZED_OUTPUTS, ONNX_OPSET, PRECISIONS, TEXT_FEATURES,
    TEXT_GRAPH, VISION_GRAPH, DEFAULT_MAX_SEQUENCE, GraphSpec, clip_graph_specs_from_config, get_model_spec, graph_specs_to_json,
)

INT8_MODES = ("qdq", "dynamic")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CALIBRATION_BATCH = 8


@dataclass
class ExportOptions:
    output: Path
    model: str = "tiny"
    model_path: Path | None = None
    random_weights: bool = False
    precision: str = "fp32"
    int8_mode: str = "qdq"
    calibration_data: Path | None = None
    calibration_size: int = 32
    validate: bool = True
    min_cosine: float | None = None
    opt_batch: int | None = None  # None: the model family's default (bgevl.specs.ModelSpec.default_batch)
    max_batch: int | None = None
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE  # MLLM language graph: prompt + image tokens
    force_fp32: bool = False  # allow fp32 for models over FP32_LIMIT_BILLIONS
    overwrite: bool = False
    probe_count: int = 8
    command: str | None = None  # the command line, recorded in the manifest


class Progress:
    def __init__(self, total: int, sink: Callable[[str], None] | None = None):
        self.total, self.step, self.start = total, 0, time.perf_counter()
        self.sink = sink or (lambda msg: print(msg, file=sys.stderr, flush=True))

    def __call__(self, message: str) -> None:
        self.step += 1
        self.sink(f"[{self.step}/{self.total}] {message} (t={time.perf_counter() - self.start:.1f}s)")

    def info(self, message: str) -> None:
        self.sink(f"      {message}")


def _check_options(opts: ExportOptions) -> None:
    if opts.precision not in PRECISIONS:
        raise BgevlError(f"--precision {opts.precision!r}: choose one of {', '.join(PRECISIONS)}")
    if opts.int8_mode not in INT8_MODES:
        raise BgevlError(f"--int8-mode {opts.int8_mode!r}: choose one of {', '.join(INT8_MODES)}")
    spec = get_model_spec(opts.model)
    default_opt, default_max = spec.default_batch
    opts.max_batch = opts.max_batch or max(default_max, opts.opt_batch or 0)
    opts.opt_batch = opts.opt_batch or min(default_opt, opts.max_batch)
    if not 1 <= opts.opt_batch <= opts.max_batch:
        raise BgevlError(f"need 1 <= --opt-batch <= --max-batch, got {opts.opt_batch} and {opts.max_batch}")
    if opts.max_sequence_length < 16:
        raise BgevlError(f"--max-sequence-length {opts.max_sequence_length}: need at least 16 tokens")
    check_replaceable(Path(opts.output), opts.overwrite, lambda d: (d / MANIFEST_NAME).is_file(),
                      "a bgevl export (manifest.json)", "--output")
    if opts.calibration_data is not None and opts.precision != "int8":
        raise BgevlError("--calibration-data only applies to --precision int8")


def load_calibration_dir(directory: Path) -> tuple[list, list[str]]:
    """Images (any common format) and captions (``*.txt``, one per line) from a directory."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise BgevlError(f"--calibration-data {directory}: no such directory")
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    image_files = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    texts = [line.strip() for p in files if p.suffix.lower() == ".txt" for line in p.read_text().splitlines() if line.strip()]
    if not image_files or not texts:
        raise BgevlError(
            f"--calibration-data {directory}: found {len(image_files)} images and {len(texts)} captions; "
            f"INT8 calibration needs both: image files (png/jpg/...) and a .txt file with one caption per line"
        )
    return [load_image(p, i) for i, p in enumerate(image_files)], texts


def _batched(feed: Mapping[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    n = len(next(iter(feed.values())))
    return [{k: v[i:i + size] for k, v in feed.items()} for i in range(0, n, size)]


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "bgevl-export": __version__}
    for dist in ("torch", "transformers", "onnx", "onnxruntime", "onnxconverter-common", "onnxscript"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def convert_graph(name: str, src: Path, dst: Path, precision: str, int8: Callable[[], dict]) -> dict:
    """Write the exported fp32 graph ``src`` at ``precision`` to ``dst`` and check it; returns what was
    done, for the manifest. ``int8`` is the model family's int8 pass (it differs: static QDQ for CLIP,
    weight-only for the MLLM)."""
    import onnx

    from bgevl.export import onnx_tools

    if precision == "fp32":
        onnx_tools.save_onnx(onnx.load(str(src)), dst)
        details = {"method": "float32 as exported"}
    elif precision == "fp16":
        details = onnx_tools.fp16_graph(src, dst, NORMALIZED_OUTPUTS.get(name))
    else:
        details = int8()
    onnx_tools.check_onnx(dst)
    return details


def run_export(opts: ExportOptions, sink: Callable[[str], None] | None = None) -> Path:
    """Run the whole export; returns the output directory."""
    _check_options(opts)
    spec = get_model_spec(opts.model)
    out = Path(opts.output).expanduser().resolve()
    progress = Progress(total=6, sink=sink)
    with staged_directory(out) as staging, tempfile.TemporaryDirectory(prefix="bgevl-export-") as work:
        if spec.family == "mllm":
            from bgevl.export.mllm_export import export_mllm

            manifest = export_mllm(spec, opts, staging, Path(work), progress)
        else:
            manifest = _export_clip(spec, opts, staging, Path(work), progress)
        write_manifest(staging, manifest)
    progress(f"wrote {out}")
    return out


def _export_clip(spec, opts: ExportOptions, staging: Path, work: Path, progress: Progress) -> dict:
    from bgevl.export import onnx_tools
    from bgevl.export.clip_modules import graph_modules
    from bgevl.reference import OriginalClip
    from bgevl.export.validate import (
        VALIDATION_ARRAYS, check_thresholds, clip_parity, clip_reference_arrays, format_figures, save_arrays, threshold_for,
    )

    source = "--model-path" if opts.model_path else ("generated" if spec.generated or opts.random_weights else "hub")
    progress(f"loading {spec.key} ({source})")
    ckpt = resolve_checkpoint(spec, model_path=opts.model_path, random_weights=opts.random_weights, workdir=work)
    model, processor = load_clip(ckpt.path, spec=spec)
    config = model.config
    graphs: dict[str, GraphSpec] = clip_graph_specs_from_config(config, opt_batch=opts.opt_batch, max_batch=opts.max_batch)
    max_len = config.text_config.max_position_embeddings
    pre = ClipPreprocessor(processor, max_len, text_overflow="truncate")
    progress.info(f"{ckpt.source}; {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
                  f"embedding dim {config.projection_dim}")

    probes = probe_set(opts.probe_count)
    feeds = {
        VISION_GRAPH: {"pixel_values": pre.pixel_values(probes.images)},
        TEXT_GRAPH: pre.tokens(probes.texts),
    }
    composed_feeds = {VISION_GRAPH: {"pixel_values": pre.pixel_values(probes.composed_images())},
                      TEXT_GRAPH: pre.tokens(probes.composed_texts())}
    modules = graph_modules(model)

    progress(f"exporting {len(graphs)} graphs to ONNX (opset {ONNX_OPSET}, fp32)")
    fp32_dir = work / "fp32"
    fp32_dir.mkdir()
    for name, gspec in graphs.items():
        example = {k: v[:2] for k, v in feeds[name].items()}
        onnx_tools.export_torch_graph(modules[name], gspec, example, fp32_dir / gspec.filename)
        progress.info(f"{gspec.filename}: {onnx_tools.file_size(fp32_dir / gspec.filename) / 1e6:.1f} MB")

    progress(f"converting to {opts.precision}" + (f" ({opts.int8_mode})" if opts.precision == "int8" else ""))
    precision_details: dict[str, dict] = {}
    calibration_info: dict = {}
    if opts.precision == "int8" and opts.int8_mode == "qdq":
        if opts.calibration_data:
            cal_images, cal_texts = load_calibration_dir(opts.calibration_data)
            calibration_info = {"source": str(Path(opts.calibration_data).resolve()), "images": len(cal_images), "texts": len(cal_texts)}
        else:
            cal_images, cal_texts = builtin_calibration_set(opts.calibration_size)
            calibration_info = {"source": "built-in synthetic set (bgevl.probes.builtin_calibration_set)",
                                "images": len(cal_images), "texts": len(cal_texts)}
        progress.info(f"calibration: {calibration_info['source']} ({len(cal_images)} images, {len(cal_texts)} texts)")
        cal_feeds = {
            VISION_GRAPH: _batched({"pixel_values": pre.pixel_values(cal_images)}, CALIBRATION_BATCH),
            TEXT_GRAPH: [pre.tokens(cal_texts[i:i + CALIBRATION_BATCH]) for i in range(0, len(cal_texts), CALIBRATION_BATCH)],
        }
    for name, gspec in graphs.items():
        src, dst = fp32_dir / gspec.filename, staging / gspec.filename
        precision_details[name] = convert_graph(
            name, src, dst, opts.precision,
            int8=lambda: onnx_tools.quantize_int8(src, dst, opts.int8_mode, cal_feeds[name] if opts.int8_mode == "qdq" else None))

    del modules, model  # the reference below is loaded on its own; do not hold two copies
    validation: dict = {"performed": False}
    figures: dict[str, dict] = {}
    if opts.validate:
        progress(f"validating against the original's fp32 embeddings on {len(probes.images)} images "
                 f"({', '.join(sorted({im.mode for im in probes.images}))}), {len(probes.texts)} texts, "
                 f"{len(probes.composed)} composed queries")
        original = OriginalClip(ckpt.path)
        arrays = clip_reference_arrays(
            feeds, composed_feeds, original.encode(images=probes.images), original.encode(text=probes.texts),
            original.encode(images=probes.composed_images(), text=probes.composed_texts()))
        del original
        sessions = {name: create_session(staging / g.filename) for name, g in graphs.items()}
        figures.update(clip_parity(arrays, lambda name, feed, outs: sessions[name].run(list(outs), dict(feed))))
        save_arrays(staging / VALIDATION_ARRAYS, arrays)
        progress.info("parity vs the original's fp32 embeddings (ONNX Runtime CPU):\n" + format_figures(figures))
        threshold = threshold_for(opts.precision, opts.min_cosine)
        validation = {
            "performed": True,
            "reference": OriginalClip.DESCRIPTION,
            "runtime": "onnxruntime CPUExecutionProvider",
            "probe_set": probes.describe(),
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
            precision=opts.precision,
            opset=ONNX_OPSET,
            source_checkpoint=ckpt.source,
            bytes=onnx_tools.file_size(staging / graphs[name].filename),
            precision_details=precision_details[name],
            validation=figures.get(name),
        )
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "key": spec.key, "family": spec.family, "description": spec.description, "source": ckpt.source,
            "weights": ckpt.weights, "embedding_dim": int(config.projection_dim), "max_text_length": int(max_len),
            "image_size": int(config.vision_config.image_size),
        },
        "precision": opts.precision,
        "int8_mode": opts.int8_mode if opts.precision == "int8" else None,
        "calibration": calibration_info or None,
        "opset": ONNX_OPSET,
        "processor_dir": "processor",
        "graphs": graph_json,
        "fusion": {
            "method": "score fusion",
            "formula": f"l2_normalize({IMAGE_FEATURES} + {TEXT_FEATURES})",
            "validation": figures.get("composed"),
        },
        "validation": validation,
        "versions": _versions(),
        "command": opts.command,
    }
