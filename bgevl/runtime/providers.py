"""ONNX Runtime execution-provider selection: TensorRT EP, then CUDA EP, then CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from bgevl.errors import BgevlError

PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
#: Preference order of ``provider="auto"``.
AUTO_ORDER = ("tensorrt", "cuda", "cpu")


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def select_providers(requested: str = "auto", available: Sequence[str] | None = None) -> list[str]:
    """Provider names for a session, most preferred first, always ending with the CPU fallback.

    ``auto`` takes every installed accelerator provider in :data:`AUTO_ORDER`; a named provider
    that is not installed is an error naming what is installed and how to get it.
    """
    available = list(available) if available is not None else available_providers()
    cpu = PROVIDERS["cpu"]
    if requested == "auto":
        chosen = [PROVIDERS[k] for k in AUTO_ORDER if PROVIDERS[k] in available]
        return chosen or [cpu]
    if requested not in PROVIDERS:
        raise BgevlError(f"provider {requested!r}: choose auto, {', '.join(PROVIDERS)}")
    name = PROVIDERS[requested]
    if name not in available:
        raise BgevlError(
            f"provider {requested!r} ({name}) is not available in this onnxruntime build (available: "
            f"{', '.join(available)}). Install the GPU build with `pip install onnxruntime-gpu` on a machine "
            f"with CUDA, or use provider='cpu'."
        )
    return [name] + ([cpu] if name != cpu else [])


def holds_float8(path: str | Path) -> bool:
    """Whether a graph stores float8 tensors (the FP8 Q/DQ form: ``--precision fp8``)."""
    import onnx

    float8 = {onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E4M3FNUZ, onnx.TensorProto.FLOAT8E5M2,
              onnx.TensorProto.FLOAT8E5M2FNUZ}
    model = onnx.load(str(path), load_external_data=False)
    return any(init.data_type in float8 for init in model.graph.initializer)


def create_session(path: str | Path, providers: Sequence | None = None, threads: int | None = None):
    """An ONNX Runtime session with quiet logging (``providers``: names or (name, options) pairs)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if holds_float8(path):
        # ONNX Runtime's CPU optimizer fuses DequantizeLinear -> MatMul into QLinearMatMul, which has no float8
        # kernel ("Type 'tensor(float8e4m3fn)' ... of operator (QLinearMatMul) is invalid", onnxruntime 1.31):
        # keep the Q/DQ nodes as they are, which ONNX Runtime runs in float8 (opset 19)
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(path), sess_options=options, providers=list(providers or [PROVIDERS["cpu"]]))


def provider_options_for(providers: Sequence[str], artifact_dir: Path, *, precision: str = "fp32",
                         engine_cache_dir: str | Path | None = None,
                         overrides: Mapping[str, Mapping[str, Any]] | None = None) -> list:
    """(name, options) pairs for an InferenceSession.

    TensorRT EP: engine and timing caches in ``engine_cache_dir`` (default ``<export>/trt-cache``),
    ``trt_fp16_enable`` for fp16 exports (the graph's fp32 islands stay fp32: TensorRT follows the
    Cast nodes), ``trt_int8_enable`` for QDQ int8 exports (explicit quantization, no calibration
    table). ``overrides``: per provider short name (``"tensorrt"``, ``"cuda"``), options that replace
    these, e.g. ``{"tensorrt": {"trt_max_workspace_size": 2 << 30}, "cuda": {"device_id": 1}}``.
    """
    overrides = overrides or {}
    short = {v: k for k, v in PROVIDERS.items()}
    out: list = []
    for name in providers:
        options: dict[str, Any] = {}
        if name == PROVIDERS["tensorrt"]:
            cache = Path(engine_cache_dir) if engine_cache_dir else Path(artifact_dir) / "trt-cache"
            options = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                       "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache),
                       "trt_fp16_enable": precision in ("fp16", "int8", "fp8"), "trt_int8_enable": precision == "int8"}
        options.update(overrides.get(short.get(name, name), {}))
        out.append((name, options) if options else name)
    unknown = set(overrides) - set(PROVIDERS)
    if unknown:
        raise BgevlError(f"provider options for {sorted(unknown)}: use the names {', '.join(PROVIDERS)}")
    return out
