"""OpenVINO on the CPU: the exported ONNX graphs compiled by OpenVINO, in bf16 where the CPU has it.

OpenVINO (the optional extra ``openvino``) reads the project's ONNX files as they are (dynamic batch
included) and compiles them for the CPU with an inference precision: ``bf16`` runs the matmuls,
LayerNorms and attention in bfloat16 on CPUs with AVX512-BF16 or AMX (it is OpenVINO's own
default there), ``f32`` keeps float32. An int8 QDQ graph runs its quantized matmuls in int8 and the
rest at that precision. Output tensors are float32 either way.

Every :func:`open_openvino` checks the compiled graphs against the export's stored probe set and
the original's embeddings (``validation.npz``, the same parity the export gate uses) and refuses
them under :data:`MIN_COSINE` (0.9999 for bf16 and f32 on float exports; the export's own threshold
for int8 ones): bf16 keeps 8 bits of mantissa, which is why it is validated, not assumed.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from bgevl.core.errors import BgevlError, ValidationFailed
from bgevl.runtime.runners import BackendOptions, Runner, runner_call
from bgevl.core.specs import COSINE_THRESHOLDS, GraphSpec

if TYPE_CHECKING:  # pragma: no cover
    from bgevl.core.manifest import Manifest

#: Inference precisions of the OpenVINO backend (OpenVINO's INFERENCE_PRECISION_HINT values).
OPENVINO_PRECISIONS = ("bf16", "f32")
#: Parity gate of an OpenVINO-compiled float export against the original's fp32 embeddings.
MIN_COSINE = 0.9999


def openvino_status() -> tuple[bool, str]:
    """(usable, why not): the package imports and the CPU device is there."""
    try:
        import openvino as ov
    except ImportError:
        return False, "OpenVINO is not installed (pip install 'bgevl-export[openvino]')"
    if "CPU" not in ov.Core().available_devices:
        return False, "OpenVINO has no CPU device here"
    return True, ""


def cpu_has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin computes in bf16 here (AVX512-BF16 or AMX)."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def compile_for_cpu(path: Any, precision: str, threads: int | None = None) -> Any:
    """An ONNX file compiled by OpenVINO for the CPU at ``precision`` (an explicit hint both ways: on a bf16
    CPU OpenVINO's default is bf16, so "f32" must be asked for), latency-oriented."""
    import openvino as ov

    core = ov.Core()
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return core.compile_model(core.read_model(str(path)), "CPU", config)


class OpenVinoRunner(Runner):
    """One graph compiled by OpenVINO for the CPU at ``precision`` (``bf16`` or ``f32``)."""

    def __init__(self, spec: GraphSpec, path: Any, precision: str = "bf16", threads: int | None = None):
        import openvino as ov

        if precision not in OPENVINO_PRECISIONS:
            raise BgevlError(f"OpenVINO precision {precision!r}: choose one of {', '.join(OPENVINO_PRECISIONS)}")
        if precision == "bf16" and not cpu_has_bf16():
            raise BgevlError("this CPU has no bf16 support (AVX512-BF16 or AMX) for OpenVINO; use precision 'f32'")
        self.spec, self.precision, self.max_batch = spec, precision, spec.batch.max
        self.compiled = compile_for_cpu(path, precision, threads)
        self.version = ov.get_version().split("-")[0]
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()  # an infer request serves one call at a time

    def close(self) -> None:
        with self._lock:  # not under a call in progress
            self._request = self.compiled = None

    @property
    def providers(self) -> list[str]:
        return [f"OpenVINO {self.version} CPU ({self.precision})"]

    def run_once(self, feed: Mapping[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        with self._lock:
            results = self._request.infer({name: np.ascontiguousarray(value) for name, value in feed.items()})
            # the output tensors are views of the request's buffers: copied before the next call reuses them
            return [np.array(results[self.compiled.output(name)], dtype=np.float32) for name in outputs]


def open_openvino(manifest: "Manifest", names: Sequence[str] | None = None, precision: str = "bf16",
                  threads: int | None = None, validate: bool = True) -> dict[str, OpenVinoRunner]:
    """The export's graphs compiled by OpenVINO, checked against the original's embeddings (see the module
    docstring) unless ``validate`` is False."""
    ok, why = openvino_status()
    if not ok:
        raise BgevlError(f"backend 'openvino': {why}")
    names = list(names or manifest.graphs)
    runners = {name: OpenVinoRunner(manifest.graph_spec(name), manifest.graph_path(name), precision, threads)
               for name in names}
    if validate:
        runners_figures(manifest, runners, min(MIN_COSINE, COSINE_THRESHOLDS[manifest.precision]))
    return runners


def open_backend(manifest: "Manifest", names: list[str], options: BackendOptions) -> dict[str, OpenVinoRunner]:
    """The ``openvino`` backend of ``open_runners``."""
    return open_openvino(manifest, names, options.openvino_precision, options.threads)


def runners_figures(manifest: "Manifest", runners: Mapping[str, Runner], threshold: float) -> dict[str, dict]:
    """Parity of ``runners`` on the export's stored probe set; raises ``ValidationFailed`` under ``threshold``."""
    from bgevl.core.parity import VALIDATION_ARRAYS, format_figures, load_arrays, parity
    from bgevl.core.registry import get_family

    path = manifest.directory / VALIDATION_ARRAYS
    if not path.is_file():
        raise ValidationFailed(f"{manifest.directory}: no {VALIDATION_ARRAYS} (an export made with --no-validate); "
                               f"re-export with validation, or pass validate=False to run it unchecked")
    figures = parity(get_family(manifest.family), manifest.graph_specs(), load_arrays(path), runner_call(runners))
    worst = min(f["min_cosine"] for f in figures.values())
    if not worst >= threshold:
        backend = next(iter(runners.values())).providers[0]
        raise ValidationFailed(f"{backend} on {manifest.directory.name} misses the parity gate (min cosine {worst:.6f} < "
                               f"{threshold}):\n{format_figures(figures)}")
    return figures
