"""``bgevl-bench``: one workload through several backends in one run, with readable reports.

    bgevl-bench --models tiny                                   # seconds: the suite on the tiny model
    bgevl-bench --models base,large --random-weights --batch-sizes 1,8 --output benchmarks/results/cpu
    bgevl-bench corpus --items 10000                            # bgevl-embed next to Embedder.encode (see --help)
    bgevl-bench profile EXPORT --graph vision --batch 8         # where one graph call's time goes, per operator

For each model: the exports it needs (fp32, fp16, int8; cached under ``--exports``), the PyTorch
baseline, ONNX Runtime per precision (CPU provider; the CUDA/TensorRT providers and TensorRT
engines too where present), ``bgevl.runtime`` end to end and a Triton server on the fp32 export
with a client concurrency sweep. See ``bgevl.benchmarks.suite`` for the two measurement levels.
"""

from __future__ import annotations

import argparse
import json
import datetime as _dt
import os
import platform
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bgevl.benchmarks.peers import PEERS
from bgevl.core.errors import BgevlError
from bgevl.core.registry import all_models, get_model_spec

#: Graph backends: name -> (engine, ONNX Runtime provider, export precision, int8 mode).
GRAPH_BACKENDS = {
    "onnxruntime-fp32": ("onnxruntime", "cpu", "fp32", None),
    "onnxruntime-fp16": ("onnxruntime", "cpu", "fp16", None),
    "onnxruntime-int8": ("onnxruntime", "cpu", "int8", "qdq"),
    "onnxruntime-int8-dynamic": ("onnxruntime", "cpu", "int8", "dynamic"),
    "onnxruntime-cuda-fp16": ("onnxruntime", "cuda", "fp16", None),
    "onnxruntime-tensorrt-fp16": ("onnxruntime", "tensorrt", "fp16", None),
    "tensorrt-fp16": ("tensorrt", None, "fp16", None),
    "tensorrt-int8": ("tensorrt", None, "int8", "qdq"),
    "tensorrt-fp8": ("tensorrt", None, "fp8", None),  # compute capability 8.9+
    # CPU: uint8-activation static QDQ on ONNX Runtime; OpenVINO (provider slot: its inference precision)
    "onnxruntime-int8-u8": ("onnxruntime", "cpu", "int8", "qdq-u8"),
    "openvino-bf16": ("openvino", "bf16", "fp32", None),
    "openvino-f32": ("openvino", "f32", "fp32", None),
    "openvino-int8-u8": ("openvino", "bf16", "int8", "qdq-u8"),
    "openvino-int8-u8-f32": ("openvino", "f32", "int8", "qdq-u8"),  # the same where the CPU has no bf16
}
ALL_BACKENDS = ("pytorch", "onnxruntime-fp32", "onnxruntime-fp16", "onnxruntime-int8", "onnxruntime-int8-dynamic",
                "runtime", "triton")
#: Not run unless asked for: the PyTorch baseline with glibc malloc untouched (a child process), the CPU
#: int8 form and OpenVINO (the optional extra).
OPTIONAL_BACKENDS = ("api", "api-triton", "pytorch-plain", "onnxruntime-int8-u8", "openvino-bf16", "openvino-f32", "openvino-int8-u8",
                     "openvino-int8-u8-f32", *PEERS)
#: Backends every other one is compared with round by round, where they ran (``paired`` in the results).
PAIRED_REFERENCES = ("pytorch", "pytorch-plain", "onnxruntime-fp32", "onnxruntime-int8-dynamic")
GPU_BACKENDS = ("onnxruntime-cuda-fp16", "onnxruntime-tensorrt-fp16", "tensorrt-fp16", "tensorrt-int8", "tensorrt-fp8")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bgevl-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default="tiny", help=f"comma-separated: {', '.join(all_models())}")
    p.add_argument("--random-weights", action="store_true", help="full-size architectures with random weights, offline")
    p.add_argument("--model-path", type=Path, default=None, help="local checkpoint (one model only)")
    p.add_argument("--backends", default=",".join(ALL_BACKENDS),
                   help=f"comma-separated from {', '.join(ALL_BACKENDS + OPTIONAL_BACKENDS + GPU_BACKENDS)} (GPU ones only "
                        f"where present)")
    p.add_argument("--allocator", choices=("tuned", "plain"), default="tuned",
                   help="tuned: glibc malloc keeps large blocks (PyTorch's CPU guide; bgevl.benchmarks.measure."
                        "tune_allocator) in this process; pytorch-plain always runs untuned in a child process")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-round random order of the backends")
    p.add_argument("--workloads", default="image,text,composed",
                   help="comma-separated item kinds (image, text, composed); an image kind may carry a size, e.g. "
                        "image@1280x720,image@1920x1080: every image resized to it (a screenshot model's image tokens "
                        "grow with the size; the report gives tokens/s beside items/s)")
    p.add_argument("--batch-sizes", type=_ints, default=[1, 8, 32])
    p.add_argument("--concurrency", type=_ints, default=[1, 2, 4, 8], help="Triton client concurrency sweep")
    p.add_argument("--sweep-batch", type=int, default=1, help="items per request in the Triton sweep")
    p.add_argument("--sweep-client", choices=("auto", "perf_analyzer", "threads"), default="auto",
                   help="Triton sweep load generator: perf_analyzer (Triton's own; auto: where it runs and the sweep "
                        "batch is 1) or bgevl-bench's threaded HTTP client")
    p.add_argument("--sweep-seconds", type=float, default=2.0, help="perf_analyzer measurement window per trial")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads of PyTorch and ONNX Runtime")
    p.add_argument("--peak-sizes", type=_ints, default=[1024, 2048, 4096],
                   help="square matmul sizes of the per-precision peak probes (start and end of the run)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-repeats", type=int, default=5)
    p.add_argument("--lead-in", type=int, default=1,
                   help="untimed calls of the same backend right before each timed one, so that no timed call runs "
                        "against the previous backend's still-spinning thread pool (0: none, the interleaving of "
                        "bgevl-bench before 2026-12-07)")
    p.add_argument("--min-seconds", type=float, default=3.0, help="minimum timed seconds per configuration")
    p.add_argument("--output", type=Path, default=Path("out/bench"), help="report directory")
    p.add_argument("--exports", type=Path, default=None, help="export cache (default: <output>/exports)")
    p.add_argument("--label", default=None, help="report title (default: 'CPU' or the GPU name, with the date)")
    p.add_argument("--quality-data", type=Path, default=None, metavar="DIR",
                   help="also evaluate every graph backend's export on this retrieval data (bgevl-eval --data: pairs/ "
                        "and/or triplets.json with gallery/) against the fp32 export: recall@k and mAP@k with their "
                        "differences, in the report beside the timings")
    return p


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("bgevl-export", "torch", "transformers", "onnxruntime", "onnxruntime-gpu", "tensorrt", "numpy",
                    "nvidia-pytriton", "tritonclient"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return out


def _hardware(threads: int, sizes: list[int]) -> dict[str, Any]:
    import psutil

    from bgevl.benchmarks.hardware import PRECISIONS, cpu_isa, matmul_peaks, precision_support

    isa = cpu_isa()
    if isa["model"] == "unknown CPU":
        isa["model"] = platform.processor() or "unknown CPU"
    support = precision_support(isa)
    peaks = matmul_peaks(threads, sizes, support=support)
    return {"cpu": isa["model"], "cpu_family": isa["family"], "isa": isa["flags"], "precisions": support,
            "logical_cores": os.cpu_count(), "physical_cores": psutil.cpu_count(logical=False),
            "memory_gb": psutil.virtual_memory().total / 2 ** 30, "machine": platform.machine(),
            "matmul_peaks": {p: peaks[p] for p in PRECISIONS}, "matmul_probes_start": peaks["probes"],
            "peak_probes": peaks["best"]}


def _export(key: str, precision: str, args, log, int8_mode: str | None = None) -> Path:
    from bgevl.export import ExportOptions, run_export
    from bgevl.core.registry import family_of, get_model_spec
    from bgevl.core.manifest import MANIFEST_NAME

    root = args.exports or args.output / "exports"
    int8_mode = int8_mode or "qdq"
    int8 = f"-{int8_mode}" if precision == "int8" else ""
    out = root / f"{key}{'-random' if args.random_weights else ''}-{precision}{int8}"
    if (out / MANIFEST_NAME).is_file():
        return out
    log(f"exporting {key} {precision}{int8} to {out}")
    family = family_of(get_model_spec(key))
    # cheap towers export up to the largest batch asked for; the family default otherwise (larger batches skipped)
    max_batch = max(family.default_batch[1], max(args.batch_sizes)) if family.bench_grows_max_batch else None
    return run_export(ExportOptions(output=out, model=key, precision=precision, int8_mode=int8_mode,
                                    random_weights=args.random_weights, model_path=args.model_path,
                                    max_batch=max_batch, overwrite=True), sink=lambda msg: None)


class TimedLog:
    """bgevl-bench's progress: one line per message on stderr, with the seconds since the start."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        from bgevl.core.interrupts import raise_if_interrupted

        raise_if_interrupted()
        print(f"[{time.perf_counter() - self.start:7.1f}s] {message}", file=sys.stderr, flush=True)


def _triton_request(client_module, case):
    from bgevl.serving.perf_analyzer import request_values

    inputs = []
    for name, values in request_values(case.request).items():
        tensor = client_module.InferInput(name, [len(values), 1], "BYTES")
        tensor.set_data_from_numpy(np.array(values, dtype=object).reshape(-1, 1))
        inputs.append(tensor)
    return inputs


def _usable_backends(key: str, family: Any, args: Any, notes: list) -> list[str]:
    """``--backends`` less those this model or machine cannot run, each with a note: an int8 form or fp8 the
    family lacks, OpenVINO (or its bf16) absent, PyTorch bf16 peers on a CPU without bf16."""
    from bgevl.benchmarks.hardware import bf16_absent
    from bgevl.benchmarks.peers import needs_bf16

    backends = _backends(args.backends)
    for backend in [b for b in backends if b in GRAPH_BACKENDS and GRAPH_BACKENDS[b][3]]:
        try:
            family.int8_form(GRAPH_BACKENDS[backend][3])
        except BgevlError as exc:
            notes.append(f"{key}: {backend} skipped ({exc})")
            backends.remove(backend)
    for backend in [b for b in backends if b in GRAPH_BACKENDS and GRAPH_BACKENDS[b][2] == "fp8"]:
        if not family.supports_fp8:
            notes.append(f"{key}: {backend} skipped (the {family.name} family has no fp8 form)")
            backends.remove(backend)
    if any(GRAPH_BACKENDS.get(b, ("",))[0] == "openvino" for b in backends):
        from bgevl.runtime.openvino import cpu_has_bf16, openvino_status

        ok, why = openvino_status()
        for backend in [b for b in backends if GRAPH_BACKENDS.get(b, ("",))[0] == "openvino"]:
            if not ok or (GRAPH_BACKENDS[backend][1] == "bf16" and not cpu_has_bf16()):
                notes.append(f"{key}: {backend} skipped ({why or 'this CPU has no bf16'})")
                backends.remove(backend)
    if not args.hardware["precisions"]["bf16"]["native"]:
        absent = [b for b in backends if b in PEERS and needs_bf16(b)]
        if absent:
            line = bf16_absent({"model": args.hardware["cpu"]})
            if line not in notes:
                notes.append(line)
            backends = [b for b in backends if b not in absent]
    return backends


def _open_graph_backends(key: str, spec: Any, backends: list[str], args: Any, log: Any, notes: list) -> dict[str, dict]:
    """The runners of each graph backend on its export (skipped with a note where they cannot run here)."""
    from bgevl.core.manifest import read_manifest
    from bgevl.runtime.providers import available_providers
    from bgevl.runtime.runners import open_runners

    graphs: dict[str, dict] = {}
    providers = available_providers()
    for backend in [b for b in backends if b in GRAPH_BACKENDS]:
        engine, provider, precision, int8_mode = GRAPH_BACKENDS[backend]
        if precision == "fp32" and spec.fp32_too_large:
            notes.append(f"{key}: {backend} skipped (fp32 of a {spec.billions:.1f}B model)")
            continue
        if provider == "cuda" and "CUDAExecutionProvider" not in providers or \
           provider == "tensorrt" and "TensorrtExecutionProvider" not in providers:
            notes.append(f"{key}: {backend} skipped (onnxruntime has no {provider} provider here)")
            continue
        directory = _export(key, precision, args, log, int8_mode)
        manifest = read_manifest(directory)
        if engine == "openvino":
            graphs[backend] = open_runners(manifest, backend="openvino", openvino_precision=provider or "bf16",
                                           threads=args.threads)
        elif engine == "tensorrt":
            if not manifest.engines:
                notes.append(f"{key}: {backend} skipped (no engines: `bgevl-export build-engines {directory}` on a GPU)")
                continue
            graphs[backend] = open_runners(manifest, backend="tensorrt")
        else:
            graphs[backend] = open_runners(manifest, provider=provider or "auto", threads=args.threads)
    return graphs


@dataclass
class _Measured:
    """What one model's benchmark runs: the model, its peers, graph backends, runtime, server and APIs."""

    key: str
    backends: list[str]
    model: Any
    plain: Any = None
    peers: dict[str, dict] = field(default_factory=dict)
    graphs: dict[str, dict] = field(default_factory=dict)
    runtime: Any = None
    server: Any = None
    apis: dict[str, Any] = field(default_factory=dict)

    def calls(self, case: Any, workload: str, batch: int) -> tuple[dict[str, Callable[[], Any]], dict[str, str]]:
        """Every backend's call on one case, and its level (``model`` or ``end-to-end``)."""
        calls: dict[str, Callable[[], Any]] = {}
        levels: dict[str, str] = {}
        if "pytorch" in self.backends:
            calls["pytorch"], levels["pytorch"] = self.model.torch_call(case), "model"
        if self.plain is not None:
            calls["pytorch-plain"], levels["pytorch-plain"] = self.plain.call(self.key, workload, batch), "model"
        for backend, g in {**self.peers, **self.graphs}.items():
            calls[backend], levels[backend] = self.model.graphs_call(g, case), "model"
        for name, api in self.apis.items():
            calls[name], levels[name] = _api_call(api, case), "end-to-end"
        if self.runtime is not None and "runtime" in self.backends:
            runtime, request = self.runtime, case.request

            def encode() -> Any:
                return runtime.encode(images=request.images, text=request.texts, role=request.role,
                                      instruction=request.instruction)

            calls["runtime"], levels["runtime"] = encode, "end-to-end"
        if self.server is not None and "triton" in self.backends:
            calls["triton"], levels["triton"] = _triton_call(self.server, case), "end-to-end"
        return calls, levels

    def first_outputs(self, calls: dict[str, Callable[[], Any]], workload: str, batch: int,
                      notes: list) -> dict[str, np.ndarray]:
        """Each call's output (run once before timing); a PyTorch peer that fails here is left out with a note."""
        from bgevl.benchmarks.measure import SelfTimed

        outputs = {}
        for name, call in list(calls.items()):
            try:
                value = call()
            except Exception as exc:  # noqa: BLE001 - a peer that does not work here (torch.compile) is reported
                if name not in self.peers:
                    raise
                notes.append(f"{self.key}: {name} left out from {workload} batch {batch} on ({type(exc).__name__}: "
                             f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else 'no message'})")
                del calls[name], self.peers[name]
                continue
            outputs[name] = np.asarray(value.value if isinstance(value, SelfTimed) else value, np.float32)
        return outputs

    def close(self) -> None:
        for api in self.apis.values():
            api.stop()
        if self.server is not None:
            self.server.stop()
        if self.plain is not None:
            self.plain.close()


def _timing_row(case: Any, name: str, level: str, timings: dict, outputs: dict, sampler: Any) -> dict:
    """One result row: the backend's timing of the case, with its share, pairings and accuracy."""
    from bgevl.benchmarks.hardware import row_precision
    from bgevl.benchmarks.measure import paired_ratios
    from bgevl.benchmarks.suite import min_cosine

    timing, batch = timings[name], case.batch
    stats = timing.stats()
    row = {"model": case.model, "workload": case.workload, "batch": batch, "backend": name, "level": level,
           **stats, "items_per_s": batch / (stats["p50_ms"] / 1e3),
           "tokens_per_s": case.tokens / (stats["p50_ms"] / 1e3) if case.tokens else None,
           "peak_rss_mb": sampler.peaks.get(name, 0) / 2 ** 20, "gflop_per_call": case.gflop}
    base = timings["pytorch"].stats()["p50_ms"] if "pytorch" in timings else None
    direct = timings["runtime"].stats()["p50_ms"] if "runtime" in timings else None
    if level == "model":
        row["gflops"] = case.gflop / (stats["p50_ms"] / 1e3)
        row["precision"] = row_precision(name)
        if base:
            row["speedup_vs_pytorch"] = base / stats["p50_ms"]
    elif direct and name == "triton":
        row["overhead_vs_runtime_ms"] = stats["p50_ms"] - direct
    if name in API_REFERENCES:  # the API's cost over what it fronts, paired round by round
        row["paired"] = {ref: paired_ratios(timings[ref], timing) for ref in API_REFERENCES[name] if ref in timings}
        for ref in API_REFERENCES[name]:
            if ref in timings:
                ref_ms = timings[ref].stats()["p50_ms"]
                row[f"overhead_vs_{ref}_ms"] = stats["p50_ms"] - ref_ms
                row[f"overhead_vs_{ref}_pct"] = 100 * (stats["p50_ms"] / ref_ms - 1)
    reference = outputs.get("pytorch")
    if reference is not None:
        row["min_cosine_vs_pytorch"] = min_cosine(outputs[name], reference)
    if level == "model":
        row["paired"] = {ref: paired_ratios(timings[ref], timing) for ref in PAIRED_REFERENCES
                         if ref in timings and ref != name}
    return row


def _prepare(key: str, args: Any, log: Any, sampler: Any, notes: list) -> _Measured:
    """Every export first, then the PyTorch model, its peers, the graph backends, the runtime, Triton and the APIs."""
    from bgevl.benchmarks.peers import peer_runners
    from bgevl.benchmarks.suite import BenchModel, PlainPytorch
    from bgevl.checkpoints import resolve_checkpoint
    from bgevl.core.registry import family_of, get_model_spec
    from bgevl.runtime.embedder import Embedder

    spec = get_model_spec(key)
    family = family_of(spec)
    backends = _usable_backends(key, family, args, notes)
    workdir = (args.exports or args.output / "exports") / "work" / key  # checkpoints, Triton repositories
    workdir.mkdir(parents=True, exist_ok=True)
    # Every export first, before any model is loaded: an export (int8 calibration above all) needs
    # the memory the loaded backends would hold (ViT-L int8 qdq next to them ran out of 24 GB).
    for backend in backends:
        if backend in GRAPH_BACKENDS and not (GRAPH_BACKENDS[backend][2] == "fp32" and spec.fp32_too_large):
            _export(key, GRAPH_BACKENDS[backend][2], args, log, GRAPH_BACKENDS[backend][3])
    # the float export: FLOPs are counted on its graphs, and the runtime and Triton serve it
    float_export = _export(key, "fp16" if spec.fp32_too_large else "fp32", args, log)
    log(f"{key}: loading the PyTorch model")
    checkpoint = resolve_checkpoint(spec, model_path=args.model_path, random_weights=args.random_weights, workdir=workdir)
    run = _Measured(key, backends, BenchModel(family, checkpoint.path, args.threads, float_export))
    run.plain = PlainPytorch(family, checkpoint.path, args.threads) if "pytorch-plain" in backends else None
    for peer in [b for b in backends if b in PEERS]:
        try:
            run.peers[peer] = peer_runners(run.model.baseline, peer)
        except ValueError as exc:
            notes.append(f"{key}: {peer} skipped ({exc})")
    run.graphs = _open_graph_backends(key, spec, backends, args, log, notes)
    if {"runtime", "api"} & set(backends):
        run.runtime = Embedder.load(float_export, provider="cpu", threads=args.threads)
    if {"triton", "api-triton"} & set(backends):
        run.server = _start_triton(float_export, workdir, log)
        sampler.add_process_tree("triton", run.server.process.pid)
    if {"api", "api-triton"} & set(backends):
        run.apis = _start_apis(backends, float_export, run.runtime, run.server, log)
    return run


def bench_model(key: str, args: Any, log: Any, sampler: Any, results: list, sweep: list, notes: list) -> None:
    """Measure one model: every backend on every (workload, batch), interleaved round by round."""
    from bgevl.benchmarks.measure import interleaved

    run = _prepare(key, args, log, sampler, notes)
    probe_cache: dict[str, tuple] = {}
    max_batch = min((g.max_batch for gs in run.graphs.values() for g in gs.values()), default=None)
    try:
        for workload in model_workloads(args.workloads, run.model.family, key, notes):
            for batch in args.batch_sizes:
                if max_batch is not None and batch > max_batch:
                    notes.append(f"{key}: batch {batch} skipped (the export serves up to {max_batch})")
                    continue
                log(f"{key}: {workload}, batch {batch}: preparing inputs")
                case = run.model.case(key, workload, batch)
                calls, levels = run.calls(case, workload, batch)
                outputs = run.first_outputs(calls, workload, batch, notes)
                log(f"{key}: {workload}, batch {batch}: timing {', '.join(calls)} ({case.gflop:.2f} GFLOP per call)")
                probes = _peak_probes(args, levels, probe_cache)
                timings = interleaved({**calls, **{name: call for name, (call, _) in probes.items()}},
                                      warmup=args.warmup, min_repeats=args.min_repeats, min_seconds=args.min_seconds,
                                      sampler=sampler, seed=args.seed + batch, lead_in=args.lead_in)
                rows = [_timing_row(case, name, levels[name], timings, outputs, sampler) for name in calls]
                _paired_peak_shares(rows, timings, probes)
                results.extend(rows)
                _versus_best_pytorch(rows, timings)
                sampler.peaks.clear()
        if run.server is not None and "triton" in run.backends:
            _sweep(run.server, run.model, key, args, log, sweep, notes)
    finally:
        run.close()


#: the name of a precision's peak probe among the timed calls of a configuration (never a result row)
PEAK_PROBE = "peak probe {}"


def _peak_probes(args: Any, levels: dict[str, str], cache: dict[str, tuple]) -> dict[str, tuple]:
    """``{timed-call name: (call, GFLOP)}``: the probe that gave the run's peak of each precision a model-level
    row of this configuration computes in (made once per model, ``cache``), timed in the same rounds as the
    rows (:func:`_paired_peak_shares`)."""
    from bgevl.benchmarks.hardware import probe_call, row_precision

    best = getattr(args, "hardware", {}).get("peak_probes", {})
    precisions = (row_precision(name) for name, level in levels.items() if level == "model")
    wanted = {p for p in precisions if p is not None and p in best}
    for precision in wanted - set(cache):
        call, flops = probe_call(best[precision], args.threads)
        cache[precision] = (call, flops / 1e9)
    return {PEAK_PROBE.format(precision): cache[precision] for precision in sorted(wanted)}


def _paired_peak_shares(rows: list[dict], timings: dict, probes: dict[str, tuple]) -> None:
    """Each model-level row's share of its precision's peak, paired round by round with that precision's probe
    (``peak_fraction_paired``; the probe's own p50 rate as ``peak_probe_gflops``)."""
    from bgevl.benchmarks.hardware import paired_peak_share

    for row in rows:
        name = PEAK_PROBE.format(row.get("precision"))
        if row["level"] != "model" or name not in probes or not row.get("gflop_per_call"):
            continue
        probe = timings[name]
        row["peak_fraction_paired"] = paired_peak_share(row["gflop_per_call"], timings[row["backend"]].seconds,
                                                        probes[name][1], probe.seconds)
        row["peak_probe_gflops"] = probes[name][1] / (probe.stats()["p50_ms"] / 1e3)


def _versus_best_pytorch(rows: list[dict], timings: dict) -> None:
    """Each model-level row of one configuration against the best PyTorch variant of each accuracy class
    (``bgevl.benchmarks.peers``), paired round by round: ``row["vs_best_pytorch"]["0.9999"]`` is
    ``{"peer": name, **paired_ratios}``."""
    from bgevl.benchmarks.measure import paired_ratios
    from bgevl.benchmarks.peers import best_peers

    model_rows = [r for r in rows if r["level"] == "model"]
    best = best_peers(model_rows)
    for row in model_rows:
        row["vs_best_pytorch"] = {str(threshold): {"peer": peer, **paired_ratios(timings[peer], timings[row["backend"]])}
                                  for threshold, peer in best.items() if peer is not None and peer != row["backend"]}


#: the embeddings API backends and what each is measured against (its paired ratios, its overhead)
API_REFERENCES = {"api": ("runtime",), "api-triton": ("triton",)}


def _start_apis(backends: list[str], export: Path, runtime, server, log) -> dict[str, Any]:
    """The embeddings API (bgevl.api) in threads of this process: ``api`` on the runtime's Embedder, ``api-triton``
    in front of the Triton server; each answers on a loopback port."""
    from bgevl.api.backends import EmbedderBackend, TritonBackend
    from bgevl.api.cli import ApiServer

    apis = {}
    if "api" in backends:
        apis["api"] = ApiServer(EmbedderBackend(export, name="bgevl", embedder=runtime)).start()
    if "api-triton" in backends:
        apis["api-triton"] = ApiServer(TritonBackend(server.grpc_url, name="bgevl")).start()
    for name, api in apis.items():
        api.wait_ready(120)
        log(f"{name}: the embeddings API at {api.url}")
    return apis


def _api_call(api, case):
    """One POST /v1/embeddings of the case's items on a kept-alive connection, answered in base64 (the openai
    client's default) and decoded as the client does."""
    import base64
    import http.client
    import urllib.parse

    request = case.request
    n = len(request)
    items = []
    for i in range(n):
        item = {}
        if request.images is not None:
            item["image"] = base64.b64encode(bytes(request.images[i])).decode()  # the workloads' PNG files
        if request.texts is not None:
            item["text"] = request.texts[i]
        items.append(item)
    body: dict[str, Any] = {"model": "bgevl", "input": items, "encoding_format": "base64"}
    if request.role is not None:
        body["input_type"] = "query" if request.role in ("q", "query") else "document"
    if request.instruction is not None:
        body["instruction"] = request.instruction
    payload = json.dumps(body).encode()
    where = urllib.parse.urlsplit(api.url)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=600)

    def call() -> np.ndarray:
        connection.request("POST", "/v1/embeddings", payload, {"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = json.loads(response.read())
        if response.status != 200:
            raise BgevlError(f"the embeddings API answered {response.status}: {answer['error']['message']}")
        return np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in answer["data"]])

    return call


def bench_quality(key: str, data: Any, results: list, args, log) -> dict[str, Any]:
    """bgevl-eval's report for the graph backends that ran for ``key``: each one's export on its engine
    against the fp32 export on ONNX Runtime's CPU provider (the fp16 export for models fp32 is not exported of)."""
    from bgevl.core.registry import get_model_spec
    from bgevl.quality.evaluate import EvalOptions, RunSpec, evaluate

    float_precision = "fp16" if get_model_spec(key).fp32_too_large else "fp32"
    runs = [RunSpec(_export(key, float_precision, args, log), "onnxruntime", provider="cpu", threads=args.threads,
                    label=f"onnxruntime-{float_precision}")]
    ran = dict.fromkeys(r["backend"] for r in results if r["model"] == key and r["backend"] in GRAPH_BACKENDS)
    for backend in ran:
        engine, provider, precision, int8_mode = GRAPH_BACKENDS[backend]
        if backend == runs[0].label:
            continue
        export = _export(key, precision, args, log, int8_mode)
        options = {"openvino_precision": provider} if engine == "openvino" else {"provider": provider or "auto"}
        runs.append(RunSpec(export, engine, threads=args.threads, label=backend, **options))
    log(f"{key}: retrieval quality of {', '.join(str(r.label) for r in runs)} on {data.location}")
    return evaluate(data, runs, EvalOptions(progress=False), say=log)


def _start_triton(export: Path, workdir: Path, log):
    from bgevl.serving.repository import write_repository
    from bgevl.serving.server import TritonServer

    repo = write_repository(export, workdir / "triton", overwrite=True, sink=None)
    log(f"starting Triton on {repo}")
    return TritonServer(repo, http_port=None, grpc_port=None, metrics_port=None).start()


def _triton_call(server, case):
    import tritonclient.http as http

    client = http.InferenceServerClient(server.http_url)
    inputs = _triton_request(http, case)
    return lambda: client.infer("bgevl", inputs).as_numpy("EMBEDDING")


def _sweep_client(args) -> tuple[Any, str]:
    """(perf_analyzer binary or None, why the threaded client measures instead)."""
    from bgevl.serving import perf_analyzer

    if args.sweep_client == "threads":
        return None, "--sweep-client threads"
    binary, why = perf_analyzer.find()
    if args.sweep_client == "perf_analyzer" and binary is None:
        raise BgevlError(f"--sweep-client perf_analyzer: {why}")
    if binary is not None and args.sweep_batch != 1:
        why = f"--sweep-batch {args.sweep_batch}: the perf_analyzer sweep sends one item per request"
        if args.sweep_client == "perf_analyzer":
            raise BgevlError(f"--sweep-client perf_analyzer with {why}; use --sweep-batch 1 or --sweep-client threads")
        return None, why
    return binary, why


def model_workloads(requested: str, family: Any, key: str, notes: list | None = None) -> list[str]:
    """The ``--workloads`` a model is measured on: those of its family's declared item kinds
    (``Recipe.kinds``); the others are skipped with a note, an unknown one is refused."""
    from bgevl.benchmarks.suite import split_workload

    chosen = []
    for workload in [w for w in requested.split(",") if w]:
        if split_workload(workload)[0] in family.kinds:
            chosen.append(workload)
        elif notes is not None:
            notes.append(f"{key}: {workload} skipped (the {family.name} family embeds no {workload} items)")
    return chosen


def _perf_analyzer_sweep(binary, server, model, key: str, args, log, sweep: list) -> None:
    import tempfile

    from bgevl.serving import perf_analyzer

    with tempfile.TemporaryDirectory(prefix="bgevl-bench-perf-") as work:
        for workload in model_workloads(args.workloads, model.family, key):
            case = model.case(key, workload, 1)
            data = Path(work) / f"{workload}.json"
            inputs = {name: perf_analyzer.bytes_tensor(values) for name, values in perf_analyzer.request_values(case.request).items()}
            data.write_text(json.dumps({"data": [inputs]}))
            log(f"{key}: Triton sweep with perf_analyzer, {workload}, concurrency {args.concurrency}")
            for row in perf_analyzer.run("bgevl", server.grpc_url, data, args.concurrency,
                                         measurement_ms=int(args.sweep_seconds * 1000), binary=binary):
                sweep.append({"model": key, "workload": workload, "batch": 1, "concurrency": row["concurrency"],
                              "requests": None, "items_per_s": row["requests_per_s"], "p50_ms": row["p50_ms"],
                              "p90_ms": row["p90_ms"], "p99_ms": row["p99_ms"], "server_queue_ms": row["server_queue_ms"],
                              "client": f"perf_analyzer {perf_analyzer.VERSION} (gRPC)"})


def _sweep(server, model, key: str, args, log, sweep: list, notes: list) -> None:
    import tritonclient.http as http

    binary, why = _sweep_client(args)
    if binary is not None:
        _perf_analyzer_sweep(binary, server, model, key, args, log, sweep)
        return
    notes.append(f"{key}: the Triton sweep was measured with bgevl-bench's threaded HTTP client, not perf_analyzer ({why})")
    for workload in model_workloads(args.workloads, model.family, key):
        case = model.case(key, workload, args.sweep_batch)
        for concurrency in args.concurrency:
            requests = max(4 * concurrency, 8)
            log(f"{key}: Triton sweep, {workload}, concurrency {concurrency}, {requests} requests")
            inputs = _triton_request(http, case)
            latencies: list[float] = []

            def worker(i: int) -> None:
                client = http.InferenceServerClient(server.http_url)  # one per thread: it is gevent-based
                for _ in range(requests // concurrency):
                    t0 = time.perf_counter()
                    client.infer("bgevl", inputs)
                    latencies.append(time.perf_counter() - t0)

            http.InferenceServerClient(server.http_url).infer("bgevl", inputs)  # warm-up
            t0 = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(worker, range(concurrency)))
            wall = time.perf_counter() - t0
            ms = np.asarray(latencies) * 1e3
            sweep.append({"model": key, "workload": workload, "batch": args.sweep_batch, "concurrency": concurrency,
                          "requests": len(latencies), "items_per_s": len(latencies) * args.sweep_batch / wall,
                          "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
                          "p99_ms": float(np.percentile(ms, 99)), "client": "bgevl-bench threads (HTTP)"})


def main(argv: list[str] | None = None) -> int:
    from bgevl.core.interrupts import run_cli

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["corpus"]:  # corpus embedding end to end (bgevl.benchmarks.corpus)
        from bgevl.benchmarks.corpus import main as corpus_main

        return corpus_main(argv[1:])
    if argv[:1] == ["profile"]:  # per-operator profile of one graph (bgevl.benchmarks.profile)
        from bgevl.benchmarks.profile import main as profile_main

        return run_cli("bgevl-bench profile", lambda: profile_main(argv[1:]))
    args = build_parser().parse_args(argv)
    # Ctrl-C, SIGTERM: exports in progress, temporary folders, servers and the baseline process are cleaned up
    # by the context managers and finally blocks on the way out; what was measured is already written
    return run_cli("bgevl-bench", lambda: _run(args, argv),
                   f"interrupted; nothing half-written was left, and the models finished so far are in {args.output}")


def _backends(option: str) -> list[str]:
    """The ``--backends`` list, an unknown name refused in one line."""
    backends = [b for b in option.split(",") if b]
    known = ALL_BACKENDS + OPTIONAL_BACKENDS + GPU_BACKENDS
    unknown = set(backends) - set(known)
    if unknown:
        raise BgevlError(f"--backends: unknown {sorted(unknown)}; choose from {', '.join(known)}")
    return backends


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    from bgevl.benchmarks.measure import MemorySampler
    from bgevl.benchmarks.report import write_reports

    log = TimedLog()
    models = [m for m in args.models.split(",") if m]
    if args.model_path and len(models) != 1:
        raise BgevlError("--model-path needs exactly one --models entry")
    _backends(args.backends)  # unknown backends and models are refused before the peaks are measured (seconds)
    for key in models:
        get_model_spec(key)
    quality_data = None
    if args.quality_data is not None:  # malformed data is refused before anything is measured
        from bgevl.quality.data import load_data

        quality_data = load_data(args.quality_data, "--quality-data")
    args.output.mkdir(parents=True, exist_ok=True)
    from bgevl.benchmarks.measure import tune_allocator

    allocator = tune_allocator() if args.allocator == "tuned" else {"allocator": "glibc malloc as it is (--allocator plain)"}
    log("measuring the machine's matmul peaks (fp32, bf16 where the CPU has it, int8)")
    hardware = _hardware(args.threads, args.peak_sizes)
    hardware.update(allocator)
    args.hardware = hardware
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    data: dict[str, Any] = {
        "created": created, "label": args.label or f"CPU, {created[:10]}", "command": shlex.join(["bgevl-bench", *argv]),
        "hardware": hardware, "software": _versions(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "hardware"},
        "results": [], "triton_sweep": [], "notes": [],
    }
    with MemorySampler() as sampler:
        for key in models:
            bench_model(key, args, log, sampler, data["results"], data["triton_sweep"], data["notes"])
            if quality_data is not None:
                data.setdefault("quality", {})[key] = bench_quality(key, quality_data, data["results"], args, log)
            write_reports(data, args.output)  # after each model: a crash keeps what was measured
    log("measuring the matmul peaks again (end of run)")
    from bgevl.benchmarks.hardware import matmul_peaks

    end = matmul_peaks(args.threads, args.peak_sizes, support=hardware["precisions"])
    hardware["matmul_probes_end"] = end.pop("probes")
    end.pop("best", None)
    # the shares use the best the machine showed in this run, at the start or the end
    hardware["matmul_peaks"] = {p: max(filter(None, (v, end[p])), default=None) for p, v in hardware["matmul_peaks"].items()}
    paths = write_reports(data, args.output)
    log(f"wrote {paths['markdown']} and {paths['json']}")
    print(paths["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
