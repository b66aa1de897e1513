"""TensorRT engines from an export directory (``bgevl-export build-engines DIR`` / ``--format tensorrt``).

For each graph of the manifest: parse its ONNX (the export's precision variant) with the TensorRT
ONNX parser, one optimization profile from the graph declaration (min/opt/max of every dynamic
axis, overridable from the command line), the precision plan below, a workspace limit and a
timing cache reused across builds; then the engine ``tensorrt/<graph>.plan`` with its sidecar
``<graph>.plan.json`` (TensorRT version, GPU and compute capability, profile, plan), validated on
the export's reference set (``validation.npz``: the probe feeds and the PyTorch outputs) with the
thresholds of the ONNX path. The manifest gains an ``engines`` section only when every engine
passed; on failure nothing is left behind.

Precision plans (:func:`precision_plan`), and why:

* fp32: weakly typed, TF32 *cleared* (TensorRT enables TF32 by default; its 10-bit mantissa
  would not meet the fp32 threshold of 0.99999).
* fp16: **strongly typed from the fp16 ONNX.** The fp16 graph already keeps LayerNorm, Softmax,
  RMSNorm, the rotary angles and the final L2 norm in fp32 (``onnx_tools.fp16_graph``, found by
  structure and validated with ONNX Runtime); a strongly typed network makes TensorRT keep
  exactly those types. The alternative, the FP16 builder flag on the fp32 graph with per-layer
  constraints, lets TensorRT re-decide precisions per layer, and weakly typed networks are
  deprecated since TensorRT 10.12.
* int8 (static QDQ, CLIP): explicit quantization from the QDQ ONNX (no implicit calibrator), weakly
  typed with the INT8 and FP16 flags so the layers between Q/DQ pairs may run in fp16, and
  normalization, softmax, reductions, unary ops and Pow held at fp32
  (``OBEY_PRECISION_CONSTRAINTS``): LayerNorm/RMSNorm statistics overflow in fp16.
* int8 (weight-only QDQ, MLLM): strongly typed: int8 weights dequantized into the MatMuls, the
  graph's float types elsewhere.
* int8 dynamic: refused (ONNX Runtime's dynamic/MatMulNBits ops have no TensorRT equivalent).

The plan follows the int8 form the export recorded per graph (``precision_details.int8_form``,
declared by the family), not the family itself.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from bgevl.errors import BgevlError
from bgevl.families import get_family
from bgevl.manifest import EngineEntry, Manifest, Validation, read_manifest, write_manifest
from bgevl.staging import staged_directory
from bgevl.runtime.runners import runner_call
from bgevl.runtime.tensorrt import (
    TensorRTRunner, cuda_device, import_tensorrt, sidecar_path, write_sidecar,
)
from bgevl.specs import Dim, GraphSpec

ENGINE_DIR = "tensorrt"
DEFAULT_WORKSPACE_GB = 4.0
TIMING_CACHE = "timing.cache"


@dataclass(frozen=True)
class PrecisionPlan:
    precision: str
    strongly_typed: bool
    builder_flags: tuple[str, ...] = ()
    cleared_flags: tuple[str, ...] = ()
    #: TensorRT layer types held at fp32 (``ELEMENTWISE.POW``: elementwise layers doing Pow).
    fp32_layers: tuple[str, ...] = ()
    reason: str = ""

    def describe(self) -> str:
        if self.strongly_typed:
            return "strongly typed"
        return "flags " + "+".join(self.builder_flags) if self.builder_flags else "fp32, TF32 off"


FP32_LAYERS = ("NORMALIZATION", "SOFTMAX", "REDUCE", "UNARY", "ELEMENTWISE.POW")


def precision_plan(precision: str, int8_form: str | None = None) -> PrecisionPlan:
    """``int8_form``: ``static-qdq``, ``weight-only-qdq``, or a CPU form (``dynamic``, ``weight-only-dynamic``,
    ``static-qdq-u8``), refused."""
    if precision == "fp32":
        return PrecisionPlan("fp32", False, cleared_flags=("TF32",),
                             reason="fp32 kernels; TF32 cleared to meet the fp32 threshold")
    if precision == "fp16":
        return PrecisionPlan("fp16", True, reason=(
            "strongly typed from the fp16 ONNX: TensorRT keeps the graph's types, including the fp32 "
            "LayerNorm/Softmax/RMSNorm/rotary/L2-norm parts validated with ONNX Runtime"))
    if precision == "int8":
        if int8_form == "weight-only-qdq":
            return PrecisionPlan("int8", True, reason=(
                "strongly typed from the weight-only QDQ ONNX: int8 weights dequantized into the MatMuls"))
        if int8_form == "static-qdq":
            return PrecisionPlan("int8", False, builder_flags=("INT8", "FP16", "OBEY_PRECISION_CONSTRAINTS"),
                                 fp32_layers=FP32_LAYERS, reason=(
                                     "explicit quantization from the QDQ ONNX; fp16 between Q/DQ pairs; normalization, "
                                     "softmax, reductions, unary ops and Pow held at fp32"))
        raise BgevlError(f"this export's int8 form is {int8_form!r} (a CPU form: ONNX Runtime dynamic quantization, "
                         f"MatMulNBits or uint8-activation QDQ), which TensorRT does not build; export with --precision "
                         f"int8 --int8-mode qdq (explicit Q/DQ) or --precision fp16 for TensorRT")
    raise BgevlError(f"unknown precision {precision!r}")


def axis_ranges(graph: GraphSpec, *, max_batch: int | None = None, opt_batch: int | None = None,
                max_sequence: int | None = None, max_tiles: int | None = None) -> dict[str, Dim]:
    """The graph's dynamic axes by name, with command-line overrides applied."""
    axes: dict[str, Dim] = {}
    for tensor in graph.inputs:
        for dim in tensor.dynamic_axes().values():
            axes.setdefault(dim.name, dim)
    overrides = {"batch": (opt_batch, max_batch), "sequence": (None, max_sequence), "tiles": (None, max_tiles)}
    for name, (opt, mx) in overrides.items():
        if name not in axes or (opt is None and mx is None):
            continue
        dim = axes[name]
        new_max = mx if mx is not None else dim.max
        new_opt = opt if opt is not None else min(dim.opt, new_max)
        try:
            axes[name] = Dim(name, min(dim.min, new_opt), new_opt, new_max)
        except ValueError as exc:
            raise BgevlError(f"profile for axis {name!r}: {exc}") from exc
    return axes


def profile_shapes(graph: GraphSpec, ranges: Mapping[str, Dim] | None = None) -> dict[str, dict[str, list[int]]]:
    """One optimization profile: for each input, its min/opt/max shape."""
    ranges = ranges or {}
    out = {}
    for tensor in graph.inputs:
        out[tensor.name] = {
            which: [getattr(ranges.get(d.name, d), which) if isinstance(d, Dim) else int(d) for d in tensor.shape]
            for which in ("min", "opt", "max")
        }
    return out


@dataclass
class EngineOptions:
    max_batch: int | None = None
    opt_batch: int | None = None
    max_sequence: int | None = None
    max_tiles: int | None = None
    workspace_gb: float = DEFAULT_WORKSPACE_GB
    timing_cache: Path | None = None  # default: <export>/tensorrt/timing.cache, reused by later builds
    validate: bool = True
    min_cosine: float | None = None
    extra: dict = field(default_factory=dict)


def _hold_fp32(trt, network, layer_types: tuple[str, ...]) -> int:
    wanted = {t for t in layer_types if "." not in t}
    ops = {t.split(".")[1] for t in layer_types if t.startswith("ELEMENTWISE.")}
    floats = {trt.float32, trt.float16}
    held = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        kind = layer.type.name
        match = kind in wanted
        if not match and kind == "ELEMENTWISE" and ops:
            layer.__class__ = trt.IElementWiseLayer  # the TensorRT samples' way to reach .op
            match = layer.op.name in ops
        if match and layer.num_outputs and layer.get_output(0).dtype in floats:
            layer.precision = trt.float32
            for k in range(layer.num_outputs):
                layer.set_output_type(k, trt.float32)
            held += 1
    return held


def build_engine(onnx_path: Path, engine_path: Path, graph: GraphSpec, plan: PrecisionPlan, ranges: Mapping[str, Dim],
                 workspace_bytes: int, timing_cache: Path) -> dict:
    """Build one engine with the TensorRT 10 Python API; returns what the sidecar records of the build."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # path-based: external data (> 2 GB graphs) is found beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BgevlError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for flag in plan.cleared_flags:
        config.clear_flag(getattr(trt.BuilderFlag, flag))
    held = _hold_fp32(trt, network, plan.fp32_layers) if plan.fp32_layers else 0
    profile = builder.create_optimization_profile()
    shapes = profile_shapes(graph, ranges)
    for name, s in shapes.items():
        profile.set_shape(name, s["min"], s["opt"], s["max"])
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BgevlError(f"TensorRT failed to build {graph.name} (see the TensorRT log above); try a larger "
                         f"--workspace-gb or a smaller --max-batch")
    engine_path.write_bytes(memoryview(serialized))
    timing_cache.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return {"profiles": shapes, "fp32_layers_held": held, "build_seconds": round(time.perf_counter() - start, 1),
            "layers": network.num_layers}


def build_engines(export_dir: str | os.PathLike, options: EngineOptions | None = None,
                  progress: Callable[[str], None] = print) -> Path:
    """Build, validate and register the TensorRT engines of an export directory."""
    from bgevl.export.validate import VALIDATION_ARRAYS, check_thresholds, format_figures, load_arrays, parity, threshold_for

    options = options or EngineOptions()
    manifest: Manifest = read_manifest(export_dir)
    trt = import_tensorrt()
    device = cuda_device()
    forms = {entry.precision_details.get("int8_form") for entry in manifest.graphs.values()}
    if len(forms) != 1:
        raise BgevlError(f"{manifest.directory}: the graphs' int8 forms differ ({sorted(map(str, forms))}); re-run the export")
    plan = precision_plan(manifest.precision, forms.pop())
    final = manifest.directory / ENGINE_DIR
    timing_cache = options.timing_cache or final / TIMING_CACHE
    with staged_directory(final) as staging:
        staged_cache = staging / TIMING_CACHE
        if timing_cache.is_file():
            shutil.copy2(timing_cache, staged_cache)
        entries = {}
        for name in manifest.graph_names():
            graph = manifest.graph_spec(name)
            ranges = axis_ranges(graph, max_batch=options.max_batch, opt_batch=options.opt_batch,
                                 max_sequence=options.max_sequence, max_tiles=options.max_tiles)
            engine = staging / f"{name}.plan"
            progress(f"building TensorRT engine {engine.name} ({plan.precision}, {plan.describe()}) on {device.name}")
            built = build_engine(manifest.graph_path(name), engine, graph, plan, ranges,
                                 int(options.workspace_gb * (1 << 30)), staged_cache)
            write_sidecar(engine, {
                "graph": name, "tensorrt_version": trt.__version__, "gpu": device.name,
                "compute_capability": device.compute_capability, "precision": plan.precision,
                "precision_plan": asdict(plan), "source_onnx": manifest.graphs[name].file,
                "workspace_bytes": int(options.workspace_gb * (1 << 30)),
                "built": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **built,
            })
            progress(f"  {engine.name}: {engine.stat().st_size / 1e6:.1f} MB in {built['build_seconds']} s")
            entries[name] = EngineEntry(f"{ENGINE_DIR}/{engine.name}", f"{ENGINE_DIR}/{sidecar_path(engine).name}",
                                        trt.__version__, device.name, device.compute_capability, built["profiles"],
                                        plan.reason)
        validation = Validation()
        arrays_path = manifest.directory / VALIDATION_ARRAYS
        if options.validate and arrays_path.is_file():
            runners = {name: TensorRTRunner(manifest.graph_spec(name), staging / f"{name}.plan") for name in entries}
            figures = parity(get_family(manifest.family), manifest.graph_specs(), load_arrays(arrays_path),
                             runner_call(runners))
            progress("parity vs the original's fp32 embeddings (TensorRT engines):\n" + format_figures(figures))
            threshold = threshold_for(manifest.precision, options.min_cosine)
            validation = Validation(performed=True, reference=manifest.validation.reference, arrays=VALIDATION_ARRAYS,
                                    runtime=f"TensorRT {trt.__version__} on {device.name}", figures=figures,
                                    **check_thresholds(figures, manifest.precision, threshold, manifest.model.weights))
        elif options.validate:
            progress(f"engines not validated: {arrays_path.name} is missing (export made before it was recorded)")
    manifest.engines = entries
    manifest.engine_validation = validation
    write_manifest(manifest)  # atomic: readers see the old manifest or the new one
    return final
