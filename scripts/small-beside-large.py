#!/usr/bin/env python3
"""Latency of one-text requests to the entry model while a request of many near-limit images is in flight.

Serves the export's repository on the bundled CPU Triton server, sends one request of ``--images``
6300x6300 1-bit PNGs (each just under the default pixel limit) to ``bgevl``, and while it is in flight
sends one-text requests to ``bgevl`` back to back; prints the small requests' p50/p99 and how long the
large one took. Example (docs/serving.md's figures):

    .venv/bin/bgevl-export --model tiny --output out/tiny-fp32
    .venv/bin/python scripts/small-beside-large.py out/tiny-fp32 --images 64
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from PIL import Image

from bgevl.serving.repository import write_repository
from bgevl.serving.server import TritonServer


def png(color: int) -> bytes:
    out = io.BytesIO()
    Image.new("1", (6300, 6300), color=color).save(out, "PNG")
    return out.getvalue()


def bytes_input(name: str, values: list[bytes]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [len(values), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(values, dtype=object).reshape(-1, 1))
    return tensor


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export", type=Path)
    p.add_argument("--images", type=int, default=64, help="near-limit images in the large request")
    args = p.parse_args()
    large = [png(i % 2) for i in range(args.images)]
    with tempfile.TemporaryDirectory(prefix="bgevl-small-large-") as work:
        repo = write_repository(args.export, Path(work) / "repo", sink=None)
        with TritonServer(repo, http_port=None, grpc_port=None, metrics_port=None) as server:
            client = grpcclient.InferenceServerClient(server.grpc_url)
            client.infer("bgevl", [bytes_input("TEXT", [b"warm up"])])
            done: dict[str, float] = {}

            def send_large():
                began = time.monotonic()
                client_large = grpcclient.InferenceServerClient(server.grpc_url)
                client_large.infer("bgevl", [bytes_input("IMAGE", large)], client_timeout=600)
                done["large_s"] = time.monotonic() - began

            thread = threading.Thread(target=send_large)
            thread.start()
            time.sleep(0.5)  # the large request is being decoded
            latencies = []
            while "large_s" not in done:
                began = time.perf_counter()
                client.infer("bgevl", [bytes_input("TEXT", [b"a photo of a cat"])])
                latencies.append(time.perf_counter() - began)
            thread.join()
    ms = np.array(latencies) * 1e3
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").is_file() else platform.machine()
    print(f"CPU: {cpu} ({len(os.sched_getaffinity(0))} cores), {len(latencies)} one-text requests while a "
          f"{args.images}-image request ran {done['large_s']:.1f} s: p50 {np.percentile(ms, 50):.1f} ms, "
          f"p99 {np.percentile(ms, 99):.1f} ms, max {ms.max():.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
