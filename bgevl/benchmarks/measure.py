"""Timing, memory and hardware-peak measurement of the benchmark suite.

* :func:`interleaved`: the backends of one configuration are timed in rounds, one call of each per
  round in turn, so slow drift of a noisy machine (thermal, other tenants) affects all of them
  alike and the ratios between them stay meaningful. Each backend is warmed up first.
* :class:`MemorySampler`: a thread reading the resident set size (psutil) every few milliseconds
  and charging it to the backend whose call is running; the peak is process-wide (model weights
  of all loaded backends included) plus, for Triton, the server's process tree.
* :func:`matmul_peak_gflops`: the machine's attainable fp32 matmul rate, measured on the same run
  with torch (same thread count), the reference for each encoder's achieved GFLOP/s.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np


@dataclass
class Timing:
    seconds: list[float] = field(default_factory=list)

    def stats(self) -> dict[str, float]:
        s = np.asarray(self.seconds) * 1e3
        return {"p50_ms": float(np.percentile(s, 50)), "p90_ms": float(np.percentile(s, 90)),
                "p99_ms": float(np.percentile(s, 99)), "mean_ms": float(s.mean()), "min_ms": float(s.min()),
                "repetitions": int(len(s))}


def interleaved(calls: Mapping[str, Callable[[], object]], *, warmup: int = 2, min_repeats: int = 5,
                max_repeats: int = 200, min_seconds: float = 3.0, on_round: Callable[[str], None] | None = None,
                sampler: "MemorySampler | None" = None) -> dict[str, Timing]:
    """Time every call in rounds until each has ``min_repeats`` and the run lasted ``min_seconds``."""
    for name, call in calls.items():
        for _ in range(warmup):
            if sampler:
                sampler.current = name
            call()
    timings = {name: Timing() for name in calls}
    start = time.perf_counter()
    rounds = 0
    while rounds < max_repeats and (rounds < min_repeats or time.perf_counter() - start < min_seconds):
        for name, call in calls.items():
            if sampler:
                sampler.current = name
            t0 = time.perf_counter()
            call()
            timings[name].seconds.append(time.perf_counter() - t0)
            if sampler:
                sampler.sample(name)  # calls shorter than the sampling interval still count
        if sampler:
            sampler.current = None
        rounds += 1
        if on_round and rounds % 5 == 0:
            on_round(f"{rounds} rounds")
    return timings


class MemorySampler:
    """Peak resident memory per backend (see the module docstring for what it includes)."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.current: str | None = None
        self.peaks: dict[str, int] = {}
        self.extra_pids: dict[str, Sequence[int]] = {}  # backend -> other processes to add (a server)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self, name: str | None) -> int:
        import psutil

        total = self.process.memory_info().rss
        for pid in self.extra_pids.get(name, ()):
            try:
                proc = psutil.Process(pid)
                total += proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
            except psutil.Error:
                pass
        return total

    def sample(self, name: str) -> None:
        rss = self._rss(name)
        if rss > self.peaks.get(name, 0):
            self.peaks[name] = rss

    def _run(self) -> None:
        while not self._stop.is_set():
            name = self.current
            if name is not None:
                self.sample(name)
            time.sleep(self.interval)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def matmul_peak_gflops(threads: int | None = None, size: int = 2048, repeats: int = 10) -> float:
    """Best fp32 GFLOP/s of a square matmul (torch, MKL/oneDNN), the machine's attainable peak."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best / 1e9
