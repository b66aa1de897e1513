"""ONNX Runtime execution-provider selection: TensorRT EP, then CUDA EP, then CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

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


def create_session(path: str | Path, providers: Sequence | None = None, threads: int | None = None):
    """An ONNX Runtime session with quiet logging (``providers``: names or (name, options) pairs)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=options, providers=list(providers or [PROVIDERS["cpu"]]))


def provider_options_for(providers: Sequence[str], artifact_dir: Path) -> list:
    """(name, options) pairs: the TensorRT EP caches its engines beside the artifacts."""
    out: list = []
    for name in providers:
        if name == PROVIDERS["tensorrt"]:
            cache = Path(artifact_dir) / "trt-cache"
            out.append((name, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                               "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache)}))
        else:
            out.append(name)
    return out
