#!/usr/bin/env python3
"""Measure the dynamic-batching delay trade-off with perf_analyzer on the bundled CPU Triton server.

For each --triton-queue-delay-us value: write the export's repository with that delay on every
model, serve it, and run perf_analyzer (the repository's own input data) at each concurrency.
Prints a Markdown table (and writes JSON with --json). Example (the README's table):

    .venv/bin/bgevl-export --model base --random-weights --output out/base-fp32
    .venv/bin/python scripts/queue-delay-sweep.py out/base-fp32 --workload text --delays 0,500,2000,8000 --concurrency 1,16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bgevl.serving import perf_analyzer
from bgevl.serving.repository import write_repository
from bgevl.serving.server import TritonServer


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export", type=Path)
    p.add_argument("--workload", default="text")
    p.add_argument("--delays", type=ints, default=[0, 500, 2000, 8000])
    p.add_argument("--concurrency", type=ints, default=[1, 16])
    p.add_argument("--seconds", type=float, default=3.0, help="perf_analyzer measurement window")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    binary, why = perf_analyzer.find()
    if binary is None:
        print(f"queue-delay-sweep: {why}", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="bgevl-queue-sweep-") as work:
        for delay in args.delays:
            repo = write_repository(args.export, Path(work) / "repo", queue_delay_us=delay, overwrite=True, sink=None)
            with TritonServer(repo, http_port=None, grpc_port=None, metrics_port=None) as server:
                for row in perf_analyzer.run("bgevl", server.grpc_url, repo / f"perf_analyzer_{args.workload}.json",
                                             args.concurrency, measurement_ms=int(args.seconds * 1000), binary=binary):
                    rows.append({"queue_delay_us": delay, **row})
                    print(f"delay {delay} us, concurrency {row['concurrency']}: {row['requests_per_s']:.1f}/s, "
                          f"p50 {row['p50_ms']:.1f} ms", file=sys.stderr, flush=True)
    print(f"| queue delay per model | concurrency | requests/s | p50 ms | p90 ms | p99 ms | entry-model queue ms |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['queue_delay_us']} us | {r['concurrency']} | {r['requests_per_s']:.1f} | {r['p50_ms']:.1f} | "
              f"{r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['server_queue_ms']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
