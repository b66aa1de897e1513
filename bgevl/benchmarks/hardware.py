"""What the CPU computes natively, per precision, and each precision's measured matmul peak.

* :func:`cpu_isa`: the CPU model and the instruction-set extensions that decide each precision's speed,
  read from ``/proc/cpuinfo`` text (AVX2/FMA for fp32; AVX-512 F; VNNI and AMX-INT8 for int8 dot products
  that do not saturate; AVX512-BF16 and AMX-BF16 for bf16; AVX512-FP16).
* :func:`precision_support`: per precision (:data:`PRECISIONS`), the hardware that computes it here, or
  ``None`` and a one-line reason (bf16 without AVX512-BF16 or AMX is emulated: upconverted to fp32, no
  faster than fp32, so no bf16 peak is reported for it).
* :func:`matmul_peaks`: per precision, the best square-matmul rate of torch, ONNX Runtime and OpenVINO
  kernels at a few sizes (GFLOP/s; int8: GOP/s), the reference of each row's share
  (:func:`peak_share`, :func:`row_precision`); the probe that gave it is timed again beside the rows, in
  the same rounds, for a share that a noisy machine does not move (:func:`paired_peak_share`).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

#: The precisions a row computes its matrix products in, each with its own peak.
PRECISIONS = ("fp32", "bf16", "int8")
#: cpuinfo flags reported, in report order (the kernel's names).
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
             "amx_bf16", "amx_int8")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")


def read_cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return info.read()
    except OSError:
        return ""


def cpu_isa(cpuinfo: str | None = None) -> dict[str, Any]:
    """``{"model": name, "family": ..., "flags": [the ISA_FLAGS present]}`` from ``/proc/cpuinfo`` text (this
    machine's when ``None``); the first processor's entry. ``family`` is the vendor's CPU family and model
    number (virtual machines often name only the brand: "AMD EPYC"; family 25 is AMD Zen 3/Zen 4)."""
    text = read_cpuinfo() if cpuinfo is None else cpuinfo
    first: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if not line.strip() and first:
            break  # the first processor's entry only
        first.setdefault(key.strip(), value.strip())
    flags = frozenset(first.get("flags", "").split())
    family = f"family {first['cpu family']} model {first['model']}" if "cpu family" in first and "model" in first else ""
    return {"model": first.get("model name", "unknown CPU"), "family": family,
            "flags": [f for f in ISA_FLAGS if f in flags]}


def precision_support(isa: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per precision: ``{"native": bool, "how": text}``; ``how`` says what computes it, or why it is not native."""
    flags = set(isa["flags"])
    fp32 = "AVX-512 F" if "avx512f" in flags else "AVX2+FMA" if {"avx2", "fma"} <= flags else "SSE"
    bf16 = next((f for f in BF16_FLAGS if f in flags), None)
    int8 = next((f for f in INT8_FLAGS if f in flags), None)
    names = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16", "amx_int8": "AMX-INT8", "avx512_vnni": "AVX512-VNNI",
             "avx_vnni": "AVX-VNNI"}
    return {
        "fp32": {"native": True, "how": fp32},
        "bf16": {"native": bool(bf16), "how": names[bf16] if bf16 else bf16_absent(isa)},
        "int8": {"native": bool(int8), "how": names[int8] if int8 else
                 f"{isa['model']} has no VNNI or AMX: int8 dot products run on VPMADDUBSW, whose uint8 x int8 pair sums "
                 f"saturate (the u8s8 kernels are not exact; ONNX Runtime's QDQ fusions are off here)"},
    }


def bf16_absent(isa: Mapping[str, Any]) -> str:
    """The one line a report gives where the CPU has no bf16 instructions."""
    return (f"{isa['model']} has no bf16 instructions (no AVX512-BF16, no AMX-BF16): bf16 is emulated in fp32 here, "
            f"so the bf16 rows (PyTorch bf16, OpenVINO bf16) and a bf16 peak are left out")


def row_precision(backend: str) -> str | None:
    """The precision a benchmark row computes its matrix products in on the CPU (``None``: a GPU backend or an
    end-to-end row, no CPU peak). fp16 exports on ONNX Runtime's CPU provider compute in fp32."""
    if backend.startswith(("tensorrt", "onnxruntime-cuda", "onnxruntime-tensorrt")) or backend in (
            "runtime", "triton", "api", "api-triton"):
        return None
    if "int8" in backend:
        return "int8"
    if "bf16" in backend:
        return "bf16"
    return "fp32"


def peak_share(gflops: float, precision: str | None, peaks: Mapping[str, float | None]) -> float | None:
    """``gflops`` as a share of its own precision's peak; ``None`` where that peak is not measured (GPU rows,
    emulated bf16)."""
    peak = peaks.get(precision) if precision else None
    return gflops / peak if peak else None


def _best_seconds(call: Callable[[], object], repeats: int) -> float:
    for _ in range(2):
        call()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t0)
    return best


def _onnx_matmul(n: int, precision: str) -> bytes:
    """A square MatMul graph: fp32 ``MatMul``; int8 ``MatMulInteger`` (uint8 x int8, the dynamic-quantization
    kernel) or, for OpenVINO, a QDQ MatMul its low-precision pass runs in int8."""
    from onnx import TensorProto, helper

    def value(name, kind):
        return helper.make_tensor_value_info(name, kind, [n, n])

    if precision == "fp32":
        nodes, inputs, out = [helper.make_node("MatMul", ["a", "b"], ["c"])], [value("a", 1), value("b", 1)], value("c", 1)
    elif precision == "int8":
        nodes = [helper.make_node("MatMulInteger", ["a", "b"], ["c"])]
        inputs, out = [value("a", TensorProto.UINT8), value("b", TensorProto.INT8)], value("c", TensorProto.INT32)
    else:  # "qdq": float in and out, quantized operands
        scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.05])
        zu, zs = helper.make_tensor("zu", TensorProto.UINT8, [], [128]), helper.make_tensor("zs", TensorProto.INT8, [], [0])
        nodes = [helper.make_node("QuantizeLinear", ["a", "s", "zu"], ["qa"]),
                 helper.make_node("DequantizeLinear", ["qa", "s", "zu"], ["da"]),
                 helper.make_node("QuantizeLinear", ["b", "s", "zs"], ["qb"]),
                 helper.make_node("DequantizeLinear", ["qb", "s", "zs"], ["db"]),
                 helper.make_node("MatMul", ["da", "db"], ["c"])]
        inputs, out = [value("a", 1), value("b", 1)], value("c", 1)
        graph = helper.make_graph(nodes, "matmul", inputs, [out], initializer=[scale, zu, zs])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9).SerializeToString()
    graph = helper.make_graph(nodes, "matmul", inputs, [out])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9).SerializeToString()


def probe_call(key: str, threads: int | None = None) -> tuple[Callable[[], object], float]:
    """(a call, its FLOPs) of one square-matmul probe named ``"<precision>/<engine>_<n>"``: fp32 on torch,
    ``onnxruntime`` (MLAS MatMul) or ``openvino`` (f32); bf16 on torch or ``openvino`` (bf16 hint); int8 on
    ``onnxruntime`` (MatMulInteger, uint8 x int8: the dynamic-quantization kernel) or ``openvino`` (a QDQ
    MatMul its low-precision pass runs in int8). torch's CPU ``_int_mm`` is a reference loop, about 1 GOP/s on
    Zen 3: not a probe."""
    import numpy as np

    precision, rest = key.split("/")
    engine, size = rest.rsplit("_", 1)
    n = int(size)
    flops = 2.0 * n ** 3
    rng = np.random.default_rng(n)
    floats = {"a": rng.standard_normal((n, n), dtype=np.float32), "b": rng.standard_normal((n, n), dtype=np.float32)}
    if engine == "torch":
        import torch

        if threads:
            torch.set_num_threads(threads)
        a, b = torch.from_numpy(floats["a"]), torch.from_numpy(floats["b"])
        if precision == "bf16":
            a, b = a.bfloat16(), b.bfloat16()
        return (lambda: a @ b), flops
    if engine == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(_onnx_matmul(n, precision), options, providers=["CPUExecutionProvider"])
        feed = floats if precision == "fp32" else {"a": rng.integers(0, 256, (n, n), dtype=np.uint8),
                                                   "b": rng.integers(-128, 128, (n, n), dtype=np.int8)}
        return (lambda: session.run(None, feed)), flops
    if engine == "openvino":
        import openvino as ov

        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                                  "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        core = ov.Core()
        graph = _onnx_matmul(n, "qdq" if precision == "int8" else "fp32")
        request = core.compile_model(core.read_model(graph), "CPU", config).create_infer_request()
        return (lambda: request.infer(floats)), flops
    raise ValueError(f"unknown matmul probe {key!r}")


def probe_keys(sizes: Sequence[int], support: Mapping[str, Mapping[str, Any]], openvino: bool) -> list[str]:
    """The probes of :func:`matmul_peaks`: every engine of each precision at each size (bf16 only where the CPU
    computes it; OpenVINO's only where it is installed)."""
    engines = {"fp32": ("torch", "onnxruntime", "openvino"), "bf16": ("torch", "openvino"),
               "int8": ("onnxruntime", "openvino")}
    return [f"{precision}/{engine}_{n}" for n in sizes for precision in PRECISIONS for engine in engines[precision]
            if (precision != "bf16" or support["bf16"]["native"]) and (engine != "openvino" or openvino)]


def matmul_peaks(threads: int | None = None, sizes: Sequence[int] = (1024, 2048, 4096), repeats: int = 5,
                 support: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Per precision the best square-matmul rate over the probes (``{"fp32": GFLOP/s, "bf16": ..., "int8":
    GOP/s}``, ``None`` for a precision without hardware support in ``support``), every probe's figure under
    ``"probes"`` and, under ``"best"``, the probe that gave each peak (:func:`probe_call` makes it again: the
    bench times it beside the rows, :func:`paired_peak_share`). int8 probes run even without VNNI (the
    saturating kernels are what runs there)."""
    support = support or precision_support(cpu_isa())
    import importlib.util

    probes: dict[str, float] = {}
    for key in probe_keys(sizes, support, importlib.util.find_spec("openvino") is not None):
        call, flops = probe_call(key, threads)
        probes[key] = flops / _best_seconds(call, repeats) / 1e9
        del call  # one probe's session or compiled model at a time
    out: dict[str, Any] = {p: None for p in PRECISIONS}
    best: dict[str, str] = {}
    for precision in PRECISIONS:
        figures = {k: v for k, v in probes.items() if k.startswith(precision + "/")}
        if figures and (support[precision]["native"] or precision == "int8"):
            best[precision] = max(figures, key=figures.__getitem__)
            out[precision] = figures[best[precision]]
    out["probes"], out["best"] = probes, best
    return out


def paired_peak_share(gflop: float, row_seconds: Sequence[float], probe_gflop: float,
                      probe_seconds: Sequence[float]) -> float:
    """A row's share of its precision's peak, paired round by round: the median over rounds of the row's rate over
    the peak probe's rate timed in the same round. A noisy machine (another tenant, a clock change) slows both
    alike, so the share holds where a peak measured at the start or the end of the run would not."""
    import numpy as np

    shares = (gflop / np.asarray(row_seconds)) / (probe_gflop / np.asarray(probe_seconds))
    return float(np.median(shares))
