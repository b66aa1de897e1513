"""TensorRT engines from an export directory (``bgevl-export build-engines DIR`` / ``--format tensorrt``).

For each graph of the manifest: parse its ONNX (the export's precision variant) with the TensorRT
ONNX parser, one optimization profile from the graph declaration (min/opt/max of every dynamic
axis, overridable from the command line), the precision plan below, a workspace limit and a
timing cache reused across builds; then the engine ``tensorrt/<graph>.plan`` with its sidecar
``<graph>.plan.json`` (TensorRT version, GPU and compute capability, profile, plan), validated on
the export's reference set (``validation.npz``: the probe feeds and the PyTorch outputs) with the
thresholds of the ONNX path. The manifest gains an ``engines`` section only when every engine
passed; on failure nothing is left behind.

Precision plans (:func:`precision_plan`), and why. **Every network is strongly typed**: the types
come from the ONNX graph, never from builder flags or per-layer precisions. TensorRT 11 removed the
weak-typing API (``BuilderFlag.FP16/INT8/FP8/BF16``, ``OBEY/PREFER_PRECISION_CONSTRAINTS``,
``int8_calibrator``, ``ILayer.precision``, ``set_output_type``) and 10.12 deprecated it, so the
supported range is TensorRT 10.12 to 11.x (``bgevl.runtime.tensorrt.TENSORRT_REQUIREMENT``);
tests/test_tensorrt_api.py checks every TensorRT name used here against those versions' bindings.

* fp32: from the fp32 ONNX, TF32 *cleared* (TensorRT enables TF32 by default; its 10-bit mantissa
  would not meet the fp32 threshold of 0.99999).
* fp16: from the fp16 ONNX. The fp16 graph keeps LayerNorm, Softmax, RMSNorm, the rotary angles
  and the final L2 norm in fp32 (``onnx_passes.fp16_graph``, found by structure and validated with
  ONNX Runtime); a strongly typed network keeps exactly those types.
* int8 (static QDQ, CLIP): explicit quantization from the QDQ ONNX whose unquantized regions are
  fp16 with the fp16 export's fp32 islands (``onnx_passes.quantize_int8``): int8 GEMMs between the
  Q/DQ pairs, fp16 around them, LayerNorm/Softmax/final norm in fp32.
* int8 (weight-only QDQ, MLLM, Visualized-BGE): int8 weights dequantized into the MatMuls, the
  graph's float types elsewhere.
* fp8: FP8 E4M3 Q/DQ on the weight GEMMs, fp16 elsewhere (``onnx_passes.quantize_fp8``); GPUs below
  compute capability 8.9 have no FP8 and are refused before building.
* int8 dynamic / qdq-u8: refused (ONNX Runtime's dynamic/MatMulNBits ops have no TensorRT equivalent;
  uint8 activations are the CPU form).

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

from bgevl.core.errors import BgevlError
from bgevl.core.registry import get_family
from bgevl.core.manifest import EngineEntry, Manifest, Validation, read_manifest, write_manifest
from bgevl.core.staging import staged_directory
from bgevl.runtime.runners import runner_call
from bgevl.runtime.tensorrt import (
    DeviceInfo, TensorRTRunner, cuda_device, import_tensorrt, sidecar_path, write_sidecar,
)
from bgevl.core.specs import Dim, GraphSpec

ENGINE_DIR = "tensorrt"
DEFAULT_WORKSPACE_GB = 4.0
TIMING_CACHE = "timing.cache"


@dataclass(frozen=True)
class PrecisionPlan:
    precision: str
    #: always True: kept in the sidecar so engines built before weak typing was dropped are told apart
    strongly_typed: bool = True
    #: builder flags cleared (fp32: ``TF32``); no precision flag is ever set
    cleared_flags: tuple[str, ...] = ()
    reason: str = ""

    def describe(self) -> str:
        return "strongly typed" + (", TF32 off" if "TF32" in self.cleared_flags else "")


#: FP8 tensor cores: Ada (8.9), Hopper (9.0) and later.
FP8_MIN_COMPUTE_CAPABILITY = (8, 9)


def precision_plan(precision: str, int8_form: str | None = None) -> PrecisionPlan:
    """``int8_form``: ``static-qdq``, ``weight-only-qdq``, or a CPU form (``dynamic``, ``weight-only-dynamic``,
    ``static-qdq-u8``), refused."""
    if precision == "fp32":
        return PrecisionPlan("fp32", cleared_flags=("TF32",),
                             reason="strongly typed from the fp32 ONNX; TF32 cleared to meet the fp32 threshold")
    if precision == "fp16":
        return PrecisionPlan("fp16", reason=(
            "strongly typed from the fp16 ONNX: TensorRT keeps the graph's types, including the fp32 "
            "LayerNorm/Softmax/RMSNorm/rotary/L2-norm parts validated with ONNX Runtime"))
    if precision == "fp8":
        return PrecisionPlan("fp8", reason=(
            "strongly typed from the FP8 QDQ ONNX: FP8 E4M3 Q/DQ on the weight GEMMs, fp16 elsewhere with the fp16 "
            "export's fp32 islands; patch embedding and attention matmuls unquantized"))
    if precision == "int8":
        if int8_form == "weight-only-qdq":
            return PrecisionPlan("int8", reason=(
                "strongly typed from the weight-only QDQ ONNX: int8 weights dequantized into the MatMuls"))
        if int8_form == "static-qdq":
            return PrecisionPlan("int8", reason=(
                "strongly typed from the QDQ ONNX: int8 GEMMs between the Q/DQ pairs, the graph's fp16 around them "
                "and its fp32 LayerNorm/Softmax/L2-norm islands"))
        raise BgevlError(f"this export's int8 form is {int8_form!r} (a CPU form: ONNX Runtime dynamic quantization, "
                         f"MatMulNBits or uint8-activation QDQ), which TensorRT does not build; export with --precision "
                         f"int8 --int8-mode qdq (explicit Q/DQ) or --precision fp16 for TensorRT")
    raise BgevlError(f"unknown precision {precision!r}")


def check_device_for(plan: PrecisionPlan, device: DeviceInfo) -> None:
    """Refuse, in one line, a GPU that lacks the plan's reduced precision (FP8 below compute capability 8.9)."""
    if plan.precision != "fp8":
        return
    major, minor = (int(x) for x in device.compute_capability.split("."))
    if (major, minor) < FP8_MIN_COMPUTE_CAPABILITY:
        need = ".".join(map(str, FP8_MIN_COMPUTE_CAPABILITY))
        raise BgevlError(f"fp8 engines need a GPU of compute capability {need} or newer (Ada, Hopper, Blackwell); "
                         f"{device.name} is {device.compute_capability}: export with --precision int8 or fp16 for it")


def axis_ranges(graph: GraphSpec, *, max_batch: int | None = None, opt_batch: int | None = None,
                **max_axes: int | None) -> dict[str, Dim]:
    """The graph's dynamic axes by name, with command-line overrides applied: ``max_batch``/``opt_batch``,
    and ``max_<axis>`` for any other axis the graphs declare (``max_sequence``, or a family's
    ``profile_axes`` such as ``max_tiles``); an override of an axis the graph lacks does not apply to it."""
    axes: dict[str, Dim] = {}
    for tensor in graph.inputs:
        for dim in tensor.dynamic_axes().values():
            axes.setdefault(dim.name, dim)
    unknown = [key for key in max_axes if not key.startswith("max_")]
    if unknown:
        raise TypeError(f"axis_ranges: unexpected arguments {', '.join(unknown)} (axis overrides are max_<axis>)")
    overrides = {"batch": (opt_batch, max_batch), **{key[4:]: (None, value) for key, value in max_axes.items()}}
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
    #: profile maxima of other dynamic axes by axis name (``sequence``, a family's ``profile_axes``)
    axis_max: dict[str, int | None] = field(default_factory=dict)
    workspace_gb: float = DEFAULT_WORKSPACE_GB
    timing_cache: Path | None = None  # default: <export>/tensorrt/timing.cache, reused by later builds
    validate: bool = True
    min_cosine: float | None = None
    extra: dict = field(default_factory=dict)


def build_engine(onnx_path: Path, engine_path: Path, graph: GraphSpec, plan: PrecisionPlan, ranges: Mapping[str, Dim],
                 workspace_bytes: int, timing_cache: Path) -> dict:
    """Build one strongly typed engine (TensorRT 10.12+ / 11.x); returns what the sidecar records of the build."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    creation = trt.NetworkDefinitionCreationFlag
    # 10.x: weakly typed unless created STRONGLY_TYPED; 11.x: always strongly typed, the flag accepted and
    # ignored (used only where it exists, should a later version drop it)
    network = builder.create_network(1 << int(creation.STRONGLY_TYPED) if hasattr(creation, "STRONGLY_TYPED") else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # path-based: external data (> 2 GB graphs) is found beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BgevlError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if "TF32" in plan.cleared_flags:
        config.clear_flag(trt.BuilderFlag.TF32)
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
    return {"profiles": shapes, "build_seconds": round(time.perf_counter() - start, 1),
            "layers": network.num_layers}


def build_engines(export_dir: str | os.PathLike, options: EngineOptions | None = None,
                  progress: Callable[[str], None] = print) -> Path:
    """Build, validate and register the TensorRT engines of an export directory."""
    from bgevl.core.parity import VALIDATION_ARRAYS, check_thresholds, format_figures, load_arrays, parity, threshold_for

    options = options or EngineOptions()
    manifest: Manifest = read_manifest(export_dir)
    trt = import_tensorrt()
    device = cuda_device()
    forms = {entry.precision_details.get("int8_form") for entry in manifest.graphs.values()}
    if len(forms) != 1:
        raise BgevlError(f"{manifest.directory}: the graphs' int8 forms differ ({sorted(map(str, forms))}); re-run the export")
    plan = precision_plan(manifest.precision, forms.pop())
    check_device_for(plan, device)
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
                                 **{f"max_{axis}": value for axis, value in options.axis_max.items()})
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
