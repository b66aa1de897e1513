"""``bgevl-bench profile``: where the time of one graph call goes, per operator type.

    bgevl-bench profile EXPORT --graph vision --batch 8 --backend onnxruntime
    bgevl-bench profile EXPORT --graph text --batch 1 --backend openvino-f32 --static

The graph runs on the export's stored probe inputs (``validation.npz``, repeated or cut to ``--batch``),
after warm-up, under the runtime's own profiler: ONNX Runtime's (``SessionOptions.enable_profiling``: the
kernel time of every node) or OpenVINO's performance counters (``PERF_COUNT``: the real time of every
executed node, with the kernel that ran it). The report sums the time per operator type over ``--repeats``
calls and gives each type's share of the summed node time and its ms per call: what is left outside the
matrix products (attention, softmax, LayerNorm, GELU, layout conversions) is read there. ``--static``
(OpenVINO): the model reshaped to the feed's shapes before compiling (static shapes).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

BACKENDS = ("onnxruntime", "openvino-f32", "openvino-bf16")


def probe_feed(manifest: Any, graph: str, batch: int) -> dict[str, np.ndarray]:
    """The graph's inputs from the export's stored probe requests, repeated or cut to ``batch`` items."""
    from bgevl.core.parity import VALIDATION_ARRAYS, load_arrays

    arrays = load_arrays(manifest.directory / VALIDATION_ARRAYS)
    names = manifest.graph_spec(graph).input_names
    for i in range(len(arrays)):
        prefix = f"request{i}/"
        feed = {n: arrays[prefix + n] for n in names if prefix + n in arrays}
        if len(feed) == len(names):
            reps = -(-batch // len(next(iter(feed.values()))))
            return {n: np.ascontiguousarray(np.concatenate([v] * reps)[:batch]) for n, v in feed.items()}
    raise SystemExit(f"bgevl-bench profile: no probe request of {manifest.directory} feeds graph {graph!r}")


def profile_onnxruntime(path: Path, feed: dict, threads: int | None, repeats: int) -> tuple[dict[str, float], float]:
    """(microseconds per operator type over ``repeats`` calls, wall seconds per call)."""
    import time

    import onnxruntime as ort

    from bgevl.runtime.providers import cpu_has_exact_int8

    with tempfile.TemporaryDirectory(prefix="bgevl-profile-") as work:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(work) / "ort")
        if threads:
            options.intra_op_num_threads = threads
        if not cpu_has_exact_int8():  # as bgevl.runtime.providers.create_session runs it
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(2):
            session.run(None, feed)
        t0 = time.perf_counter()
        for _ in range(repeats):
            session.run(None, feed)
        wall = (time.perf_counter() - t0) / repeats
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = defaultdict(float)
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    last = sorted(e["ts"] for e in runs)[-repeats] if len(runs) >= repeats else 0  # the timed calls only
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= last:
            per_op[e["args"]["op_name"]] += e["dur"]
    return dict(per_op), wall


def profile_openvino(path: Path, feed: dict, threads: int | None, repeats: int, precision: str,
                     static: bool) -> tuple[dict[str, float], float]:
    import time

    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    if static:
        model.reshape({name: list(value.shape) for name, value in feed.items()})
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    request = core.compile_model(model, "CPU", config).create_infer_request()
    for _ in range(2):
        request.infer(feed)
    per_op: dict[str, float] = defaultdict(float)
    t0 = time.perf_counter()
    for _ in range(repeats):
        request.infer(feed)
        for info in request.get_profiling_info():  # this call's counters
            if info.status == info.Status.EXECUTED:
                per_op[f"{info.node_type} ({info.exec_type})"] += info.real_time.total_seconds() * 1e6
    wall = (time.perf_counter() - t0) / repeats
    return dict(per_op), wall


def table(per_op: dict[str, float], repeats: int, wall: float, top: int = 15) -> list[str]:
    total = sum(per_op.values())
    lines = [f"wall {wall * 1e3:.1f} ms per call (profiler on); node time {total / repeats / 1e3:.1f} ms per call", "",
             "| operator | ms per call | share |", "| --- | ---: | ---: |"]
    ranked = sorted(per_op.items(), key=lambda kv: -kv[1])
    for name, us in ranked[:top]:
        lines.append(f"| {name} | {us / repeats / 1e3:.2f} | {us / total:.1%} |")
    rest = sum(us for _, us in ranked[top:])
    if rest:
        lines.append(f"| {len(ranked) - top} other types | {rest / repeats / 1e3:.2f} | {rest / total:.1%} |")
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bgevl-bench profile", description=__doc__.split("\n\n")[0])
    p.add_argument("export", type=Path)
    p.add_argument("--graph", default="vision")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
    p.add_argument("--static", action="store_true", help="OpenVINO: reshape to the feed's shapes before compiling")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--top", type=int, default=15)
    return p


def main(argv: list[str] | None = None) -> int:
    from bgevl.core.manifest import read_manifest

    args = build_parser().parse_args(argv)
    manifest = read_manifest(args.export)
    if args.graph not in manifest.graphs:
        print(f"bgevl-bench profile: error: --graph {args.graph!r}: the export has {', '.join(manifest.graphs)}",
              file=sys.stderr)
        return 2
    feed = probe_feed(manifest, args.graph, args.batch)
    path = manifest.graph_path(args.graph)
    if args.backend == "onnxruntime":
        per_op, wall = profile_onnxruntime(path, feed, args.threads, args.repeats)
    else:
        per_op, wall = profile_openvino(path, feed, args.threads, args.repeats, args.backend.split("-")[1], args.static)
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feed.items())
    print(f"## {manifest.directory.name}: {args.graph} on {args.backend}{' (static shapes)' if args.static else ''}, {shapes}\n")
    print("\n".join(table(per_op, args.repeats, wall, args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
