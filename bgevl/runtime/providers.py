"""ONNX Runtime execution-provider selection: TensorRT EP, then CUDA EP, then CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from bgevl.core.errors import BgevlError

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


def cpu_flags() -> frozenset[str]:
    """The x86 feature flags of this machine's CPU (``/proc/cpuinfo``; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


#: CPU features with an int8 dot product that does not saturate (VNNI's VPDPBUSD, AMX tiles).
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_has_exact_int8() -> bool:
    """Whether ONNX Runtime's x86 int8 kernels are exact here. Without VNNI or AMX (AVX2-only CPUs such as AMD
    Zen 3, or AVX-512 without VNNI) they multiply uint8 by int8 with VPMADDUBSW, whose 16-bit pair sums
    saturate: ONNX Runtime's quantization guide names the accuracy drop ("U8S8 ... saturation"), and measured
    here on AMD EPYC Zen 3 the tiny CLIP's static QDQ text embeddings fell to min cosine 0.9875 against 0.999+
    on VNNI CPUs."""
    flags = cpu_flags()
    return not flags or any(f in flags for f in INT8_DOT_FLAGS)


def holds_float8(path: str | Path) -> bool:
    """Whether a graph stores float8 tensors (the FP8 Q/DQ form: ``--precision fp8``)."""
    import onnx

    float8 = {onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E4M3FNUZ, onnx.TensorProto.FLOAT8E5M2,
              onnx.TensorProto.FLOAT8E5M2FNUZ}
    model = onnx.load(str(path), load_external_data=False)
    return any(init.data_type in float8 for init in model.graph.initializer)


def create_session(path: str | Path, providers: Sequence | None = None, threads: int | None = None):
    """An ONNX Runtime session with quiet logging (``providers``: names or (name, options) pairs).

    On CPUs whose int8 kernels saturate (:func:`cpu_has_exact_int8`), the QDQ fusions are turned off
    (``session.disable_quant_qdq``): the Q/DQ pairs of a static int8 graph then run as DequantizeLinear and
    float math, which computes the int8 products exactly (what TensorRT and VNNI CPUs compute), slower but
    right. Graphs without Q/DQ nodes are unaffected."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    # ONNX Runtime's CPU optimizer fuses DequantizeLinear -> MatMul into QLinearMatMul, which has no float8
    # kernel ("Type 'tensor(float8e4m3fn)' ... of operator (QLinearMatMul) is invalid", onnxruntime 1.31):
    # float8 graphs keep their Q/DQ nodes as they are, which ONNX Runtime runs in float8 (opset 19)
    if not cpu_has_exact_int8() or holds_float8(path):
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
