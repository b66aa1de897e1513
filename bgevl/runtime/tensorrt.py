"""TensorRT engines at run time: environment probe, engine sidecars, version checks and the runner.

An engine is specific to the TensorRT version and the GPU (compute capability) it was built on.
Every engine file ``<graph>.plan`` has a JSON sidecar ``<graph>.plan.json`` recording both, the
optimization profile and the precision plan; :func:`check_compatible` compares the sidecar with
this machine before deserializing, so a mismatch is a clear "rebuild" error rather than a failed
deserialization deep inside TensorRT.

:class:`TensorRTRunner` runs one engine with the TensorRT 10.12+/11.x API (:data:`TENSORRT_REQUIREMENT`):
one execution context and one CUDA stream, input shapes set per call (``set_input_shape``), device buffers bound by address
(``set_tensor_address``) and ``execute_async_v3``. Buffers grow to the largest shape seen and are
reused, so repeated shapes never reallocate. Device memory is handled with ``cuda-python``
(the ``tensorrt`` extra), not torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bgevl.core.errors import BgevlError
from bgevl.runtime.runners import BackendOptions, Runner

SIDECAR_SUFFIX = ".json"
#: The TensorRT versions this project builds and runs engines with: every network strongly typed (the
#: types come from the ONNX graph), which TensorRT supports without deprecation from 10.12 and is the
#: only mode of 11.x (which removed the weak-typing API). The same specifier is the ``tensorrt`` extra
#: of pyproject.toml (tests/test_tensorrt_api.py checks they agree).
TENSORRT_REQUIREMENT = ">=10.12,<12"
INSTALL_HINT = "pip install 'bgevl-export[tensorrt]' on a machine with an NVIDIA GPU and CUDA"


def check_tensorrt_version(version: str) -> None:
    """Refuse, in one line naming it, a TensorRT outside :data:`TENSORRT_REQUIREMENT`."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        supported = Version(version) in SpecifierSet(TENSORRT_REQUIREMENT)
    except InvalidVersion:
        supported = False
    if not supported:
        raise BgevlError(f"TensorRT {version} is installed; bgevl-export builds strongly typed engines with TensorRT "
                         f"{TENSORRT_REQUIREMENT}: pip install 'tensorrt{TENSORRT_REQUIREMENT}' (or {INSTALL_HINT})")


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BgevlError(f"TensorRT is not installed ({exc}); {INSTALL_HINT}") from exc
    check_tensorrt_version(trt.__version__)
    return trt


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as exc:
            raise BgevlError(f"cuda-python is not installed ({exc}); {INSTALL_HINT}") from exc
    return cudart


def _check(result):
    """cuda-python calls return (error, *values)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BgevlError(f"CUDA error {err}")
    return values[0] if len(values) == 1 else values


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    compute_capability: str  # "8.9"


def cuda_device() -> DeviceInfo:
    """The current CUDA device, or a BgevlError saying there is none."""
    cudart = _cudart()
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count == 0:
        raise BgevlError("no CUDA device is visible (nvidia driver, CUDA_VISIBLE_DEVICES); TensorRT engines need one")
    props = _check(cudart.cudaGetDeviceProperties(0))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return DeviceInfo(name.strip("\x00 "), f"{props.major}.{props.minor}")


def tensorrt_status() -> tuple[bool, str]:
    """(usable, why not): TensorRT importable and a CUDA device present."""
    try:
        trt = import_tensorrt()
        device = cuda_device()
    except BgevlError as exc:
        return False, str(exc)
    return True, f"TensorRT {trt.__version__} on {device.name} (sm {device.compute_capability})"


def sidecar_path(engine: Path) -> Path:
    return engine.with_name(engine.name + SIDECAR_SUFFIX)


def write_sidecar(engine: Path, data: Mapping[str, Any]) -> Path:
    path = sidecar_path(engine)
    path.write_text(json.dumps(dict(data), indent=2) + "\n")
    return path


def read_sidecar(engine: Path) -> dict[str, Any]:
    path = sidecar_path(engine)
    if not path.is_file():
        raise BgevlError(f"{engine} has no sidecar {path.name} (TensorRT version, GPU, profiles); rebuild the engines "
                         f"with `bgevl-export build-engines DIR`")
    return json.loads(path.read_text())


def check_compatible(sidecar: Mapping[str, Any], tensorrt_version: str, device: DeviceInfo, engine: str = "engine") -> None:
    """Raise when an engine was built for another TensorRT version or GPU.

    TensorRT engines are not portable across TensorRT versions (not even minor ones by default)
    or compute capabilities; a different GPU model with the same compute capability loads, but
    its tactics were timed elsewhere, which the message says without refusing.
    """
    built_trt, built_cc = str(sidecar.get("tensorrt_version")), str(sidecar.get("compute_capability"))
    problems = []
    if built_trt != tensorrt_version:
        problems.append(f"TensorRT {built_trt} (this machine has {tensorrt_version})")
    if built_cc != device.compute_capability:
        problems.append(f"compute capability {built_cc} on {sidecar.get('gpu')} (this GPU, {device.name}, is "
                        f"{device.compute_capability})")
    if problems:
        raise BgevlError(f"{engine} was built for {' and '.join(problems)}; TensorRT engines only run where they were "
                         f"built: rebuild them here with `bgevl-export build-engines DIR`")


class DeviceBuffers:
    """Device allocations by tensor name that grow to the largest size requested and are reused."""

    def __init__(self):
        self.cudart = _cudart()
        self.allocations: dict[str, tuple[int, int]] = {}  # name -> (pointer, bytes)
        self.reallocations = 0

    def get(self, name: str, nbytes: int) -> int:
        pointer, capacity = self.allocations.get(name, (0, 0))
        if nbytes > capacity:
            if pointer:
                _check(self.cudart.cudaFree(pointer))
                self.reallocations += 1
            pointer = int(_check(self.cudart.cudaMalloc(max(nbytes, 1))))
            self.allocations[name] = (pointer, nbytes)
        return pointer

    def free(self) -> None:
        for pointer, _ in self.allocations.values():
            self.cudart.cudaFree(pointer)
        self.allocations.clear()


class TensorRTRunner(Runner):
    """A TensorRT engine of one graph (``bgevl.runtime.runners.Runner``: chunking by max batch is the base class's)."""

    def __init__(self, spec, path: Path):
        trt = import_tensorrt()
        self.trt = trt
        self.spec = spec
        sidecar = read_sidecar(path)
        check_compatible(sidecar, trt.__version__, cuda_device(), str(path))
        logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(logger)
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise BgevlError(f"TensorRT could not deserialize {path}; rebuild it with `bgevl-export build-engines DIR`")
        self.context = self.engine.create_execution_context()
        self.cudart = _cudart()
        self.stream = _check(self.cudart.cudaStreamCreate())
        self.buffers = DeviceBuffers()
        profile = sidecar["profiles"][self.spec.inputs[0].name]
        self.max_batch = int(profile["max"][0])

    @classmethod
    def from_manifest(cls, manifest, name: str) -> "TensorRTRunner":
        return cls(manifest.graph_spec(name), manifest.path_of(manifest.engine(name).file))

    @property
    def providers(self) -> list[str]:
        return [f"TensorRT {self.trt.__version__} engine"]

    def _dtype(self, name: str) -> np.dtype:
        return np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))

    def run_once(self, feed: Mapping[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        cudart = self.cudart
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        hosts = []
        for name, array in feed.items():
            host = np.ascontiguousarray(array, dtype=self._dtype(name))
            hosts.append(host)  # kept alive until the stream is synchronized
            self.context.set_input_shape(name, host.shape)
            pointer = self.buffers.get(name, host.nbytes)
            _check(cudart.cudaMemcpyAsync(pointer, host.ctypes.data, host.nbytes, h2d, self.stream))
            self.context.set_tensor_address(name, pointer)
        results = {}
        for i in range(self.engine.num_io_tensors):  # every output needs an address, requested or not
            name = self.engine.get_tensor_name(i)
            if self.engine.get_tensor_mode(name) != self.trt.TensorIOMode.OUTPUT:
                continue
            out = np.empty(tuple(self.context.get_tensor_shape(name)), dtype=self._dtype(name))
            self.context.set_tensor_address(name, self.buffers.get(name, out.nbytes))
            results[name] = out
        if not self.context.execute_async_v3(self.stream):
            raise BgevlError(f"TensorRT execution of {self.spec.name} failed (see the TensorRT log above)")
        for name in outputs:
            pointer, _ = self.buffers.allocations[name]
            _check(cudart.cudaMemcpyAsync(results[name].ctypes.data, pointer, results[name].nbytes, d2h, self.stream))
        _check(cudart.cudaStreamSynchronize(self.stream))
        return [results[name].astype(np.float32, copy=False) for name in outputs]

    def close(self) -> None:
        """Device buffers and the stream freed now (``with`` or ``Embedder.close``), not whenever the garbage
        collector gets to the runner; then the context and engine. Idempotent."""
        if getattr(self, "stream", None) is None:
            return
        self.buffers.free()
        _check(self.cudart.cudaStreamDestroy(self.stream))
        self.stream = None
        self.context = self.engine = None

    def __del__(self) -> None:  # a runner never closed: best effort (the interpreter may be shutting down)
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


def open_backend(manifest: Any, names: list[str], options: BackendOptions) -> dict[str, TensorRTRunner]:
    """The ``tensorrt`` backend of ``open_runners``: the export's built engines (``bgevl-export build-engines``)."""
    return {name: TensorRTRunner.from_manifest(manifest, name) for name in names}
