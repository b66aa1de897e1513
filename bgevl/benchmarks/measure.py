"""Timing, memory and hardware-peak measurement of the benchmark suite.

* :func:`interleaved`: the backends of one configuration are timed in rounds, one call of each per
  round in turn, so slow drift of a noisy machine (thermal, other tenants) affects all of them
  alike and the ratios between them stay meaningful. Each backend is warmed up first, and each timed
  call follows an untimed lead-in call of the same backend: the engines' thread pools keep spinning for a
  while after a call (ONNX Runtime's ``allow_spinning``, OpenMP's and oneTBB's waits), so a call timed
  right after another engine's ran against that engine's spinning threads and on its own sleeping ones.
  Measured on a 2-core Zen 4 (BGE-VL-base int8 text graph, batch 8, alternating ONNX Runtime and
  OpenVINO): without the lead-in OpenVINO took 79 ms and ONNX Runtime 69 ms, against 62 and 78 ms
  each alone; with it, 64 and 82 ms. A timed call thus measures the engine as a server runs it, back
  to back on its own threads.
* :class:`MemorySampler`: a thread reading the resident set size (psutil) every few milliseconds
  and charging it to the backend whose call is running; the peak is process-wide (model weights
  of all loaded backends included) plus, for Triton, the server's process tree.

The machine's matmul peaks per precision, the reference of each row's GFLOP/s, are measured by
``bgevl.benchmarks.hardware``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np


@dataclass
class Timing:
    seconds: list[float] = field(default_factory=list)

    def stats(self) -> dict[str, float]:
        s = np.asarray(self.seconds) * 1e3
        return {"p50_ms": float(np.percentile(s, 50)), "p90_ms": float(np.percentile(s, 90)),
                "p99_ms": float(np.percentile(s, 99)), "mean_ms": float(s.mean()), "min_ms": float(s.min()),
                "repetitions": int(len(s))}


@dataclass(frozen=True)
class SelfTimed:
    """What a call returns when it timed itself (a backend in another process: the pipe round trip is
    not its time)."""

    seconds: float
    value: object = None


def interleaved(calls: Mapping[str, Callable[[], object]], *, warmup: int = 2, min_repeats: int = 5,
                max_repeats: int = 200, min_seconds: float = 3.0, on_round: Callable[[str], None] | None = None,
                sampler: "MemorySampler | None" = None, seed: int = 0, lead_in: int = 1) -> dict[str, Timing]:
    """Time every call in rounds until each has ``min_repeats`` and the run lasted ``min_seconds``; the
    order of the calls is drawn afresh each round (``seed``), so no backend always runs first, after the
    same neighbour or in the same phase of a periodic disturbance. Each timed call comes right after
    ``lead_in`` untimed calls of the same backend (see the module docstring; 0: none).
    ``Timing.seconds[i]`` of every backend is from round ``i``: ratios can be paired per round
    (:func:`paired_ratios`)."""
    rng = np.random.default_rng(seed)
    for name, call in calls.items():
        for _ in range(warmup):
            if sampler:
                sampler.current = name
            call()
    timings = {name: Timing() for name in calls}
    names = list(calls)
    start = time.perf_counter()
    rounds = 0
    while rounds < max_repeats and (rounds < min_repeats or time.perf_counter() - start < min_seconds):
        for name in rng.permutation(names):
            call = calls[name]
            if sampler:
                sampler.current = name
            for _ in range(lead_in):
                call()
            t0 = time.perf_counter()
            result = call()
            elapsed = time.perf_counter() - t0
            timings[name].seconds.append(result.seconds if isinstance(result, SelfTimed) else elapsed)
            if sampler:
                sampler.sample(name)  # calls shorter than the sampling interval still count
        if sampler:
            sampler.current = None
        rounds += 1
        if on_round and rounds % 5 == 0:
            on_round(f"{rounds} rounds")
    return timings


def paired_ratios(reference: Timing, other: Timing) -> dict[str, float]:
    """``reference`` time / ``other`` time, round by round (how many times faster ``other`` is): the median,
    the 10th and 90th percentiles, and the share of rounds ``other`` won. A spread that straddles 1 means
    the difference is inside this machine's noise."""
    ratios = np.asarray(reference.seconds) / np.asarray(other.seconds)
    p10, p50, p90 = np.percentile(ratios, [10, 50, 90])
    return {"median": float(p50), "p10": float(p10), "p90": float(p90), "won": float(np.mean(ratios > 1.0)),
            "rounds": int(len(ratios)), "inside_noise": bool(p10 <= 1.0 <= p90)}


#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_allocator() -> dict[str, object]:
    """glibc malloc as PyTorch's CPU performance guide asks of an allocator ("reusing memory as much as
    possible"): large blocks stay on the heap and are not returned to the system between calls. Without
    it, eager PyTorch maps and unmaps its activation buffers on every call (over a million minor page
    faults per 10 ViT-B/16 calls at batch 8). The same knobs as
    ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=1073741824``, set
    in-process with ``mallopt``; applies to every backend of this process."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return {"allocator": "default (not glibc: not tuned)"}
    libc = ctypes.CDLL("libc.so.6")
    ok = libc.mallopt(_M_MMAP_THRESHOLD, 256 * 2 ** 20) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 30) == 1
    return {"allocator": "glibc malloc tuned: mmap_threshold 256 MiB, trim_threshold 1 GiB (mallopt)" if ok
            else "glibc malloc (mallopt refused: not tuned)"}


class MemorySampler:
    """Peak resident memory per backend (see the module docstring for what it includes)."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.current: str | None = None
        self.peaks: dict[str, int] = {}
        self.extra: dict[str | None, list] = {}  # backend -> other processes to add (a server and its stubs)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def add_process_tree(self, name: str, pid: int) -> None:
        """Count a process and its children (resolved now, once: scanning /proc on every sample
        would load the machine being measured) in ``name``'s peak."""
        import psutil

        root = psutil.Process(pid)
        self.extra[name] = [root] + root.children(recursive=True)

    def _rss(self, name: str | None) -> int:
        import psutil

        total = self.process.memory_info().rss
        for proc in self.extra.get(name, ()):
            try:
                total += proc.memory_info().rss
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
