"""``Embedder.load(..., backend="auto")``: the fastest way to run an export here that passes its parity gate.

The candidates are the forms this export can run in on this machine (:func:`candidates`): ONNX Runtime
(with the requested provider), OpenVINO f32 and, where the CPU computes bf16 (AVX512-BF16 or AMX), OpenVINO
bf16, and the TensorRT engines where the export has them. Each is opened and run on the export's stored
probe set (``validation.npz``: the images, texts and composed queries the export gate used; CLIP: 8 of each)
against the original's embeddings, with the gate of its form (ONNX Runtime and TensorRT: the export's
precision threshold; OpenVINO: also at most 0.9999); that first run is also its warm-up. The gate-passing
candidates are then timed on the same probe requests cut to :data:`TIMED_ITEMS` items each, in
:data:`TIMED_ROUNDS` rounds that call every candidate in turn (each timed run right after an untimed call of
the same candidate, so that it runs on its own awake threads, not against the previous candidate's spinning
ones), each candidate's best round counting (a loaded machine slows some calls, not the best of interleaved
ones), and the fastest is kept (:func:`choose`).

Why a measurement at load and not a table by CPU kind: the ranking changes with the CPU's ISA (OpenVINO bf16
about 2x ONNX Runtime fp32 on a Zen 4 with AVX512-BF16, not offered at all on an AVX2-only Zen 3), with
the precision of the export (int8 QDQ graphs on ONNX Runtime run without their QDQ fusions on CPUs without
VNNI) and with the thread count, and the probe set already runs at load for OpenVINO's gate. The cost is about
two probe-set runs per candidate (BGE-VL-base on a 2-core Zen 3: 20-30 s for the whole load with two
candidates, on a shared machine); pass the backend by name to skip it. A choice
within :data:`KEEP_DEFAULT_WITHIN` of ONNX Runtime keeps ONNX Runtime: the difference is inside a loaded
machine's noise and ONNX Runtime is the default backend with no optional dependency.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, cast

from bgevl.core.errors import BgevlError

log = logging.getLogger("bgevl")

#: a candidate must be this much faster than ONNX Runtime (relative) to be chosen over it
KEEP_DEFAULT_WITHIN = 0.05
#: the timed runs: each probe request cut to this many items, every candidate once per round, best round kept
TIMED_ITEMS, TIMED_ROUNDS = 4, 2
DEFAULT = "onnxruntime"


@dataclass(frozen=True)
class Candidate:
    name: str  # "onnxruntime", "openvino-f32", "openvino-bf16", "tensorrt"
    backend: str  # the ``open_runners`` backend
    options: dict = field(default_factory=dict)


@dataclass
class BackendChoice:
    """What ``backend="auto"`` chose and why: ``seconds`` per gate-passing candidate (one timed run of the probe
    set), ``refused`` per candidate that did not open or missed its gate (the one-line reason)."""

    chosen: str
    reason: str
    seconds: dict[str, float] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)


def candidates(manifest: Any) -> list[Candidate]:
    """The forms of this export worth timing on this machine."""
    out = [Candidate(DEFAULT, "onnxruntime")]
    from bgevl.runtime.openvino import openvino_status

    if openvino_status()[0]:
        from bgevl.runtime.openvino import cpu_has_bf16

        out.append(Candidate("openvino-f32", "openvino", {"openvino_precision": "f32"}))
        if cpu_has_bf16():
            out.append(Candidate("openvino-bf16", "openvino", {"openvino_precision": "bf16"}))
    if manifest.engines:
        out.append(Candidate("tensorrt", "tensorrt"))
    return out


def choose(seconds: Mapping[str, float], refused: Mapping[str, str] | None = None) -> BackendChoice:
    """The fastest of the gate-passing candidates (``seconds``: their probe-run times), ONNX Runtime when it is
    within :data:`KEEP_DEFAULT_WITHIN` of the fastest; the reason names every figure."""
    refused = dict(refused or {})
    if not seconds:
        raise BgevlError("backend 'auto': no backend passed the parity gate here ("
                         + "; ".join(f"{k}: {v}" for k, v in refused.items()) + "); pass a backend explicitly")
    fastest = min(seconds, key=seconds.__getitem__)
    chosen = fastest
    if DEFAULT in seconds and seconds[DEFAULT] <= seconds[fastest] * (1 + KEEP_DEFAULT_WITHIN):
        chosen = DEFAULT
    timed = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in sorted(seconds.items(), key=lambda kv: kv[1]))
    reason = f"the fastest that passes the parity gate on the probe set ({timed})"
    if chosen != fastest:
        reason = (f"ONNX Runtime, within {KEEP_DEFAULT_WITHIN:.0%} of the fastest ({fastest}) that passes the parity "
                  f"gate on the probe set ({timed})")
    if refused:
        reason += "; not used: " + "; ".join(f"{k} ({v})" for k, v in refused.items())
    return BackendChoice(chosen, reason, dict(seconds), refused)


def _gate(manifest: Any, runners: Mapping[str, Any], candidate: Candidate) -> None:
    from bgevl.runtime.openvino import MIN_COSINE, runners_figures
    from bgevl.core.specs import COSINE_THRESHOLDS

    threshold = COSINE_THRESHOLDS[manifest.precision]
    if candidate.backend == "openvino":
        threshold = min(MIN_COSINE, threshold)
    runners_figures(manifest, runners, threshold)


def _timed_feeds(manifest: Any) -> list[dict]:
    """The export's probe requests as feeds, each cut to ``TIMED_ITEMS`` items where its inputs are
    batch-aligned (read once per load; every timed run reuses them)."""
    from bgevl.core.parity import VALIDATION_ARRAYS, load_arrays

    arrays = load_arrays(manifest.directory / VALIDATION_ARRAYS)
    requests = sorted({k.split("/")[0] for k in arrays if k.startswith("request")})
    feeds = [{k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(r + "/")} for r in requests]
    # cut where every input of a request has its items on the first axis (not the MLLM's image tiles)
    return [{k: v[:TIMED_ITEMS] for k, v in f.items()} if len({len(v) for v in f.values()}) == 1 else f for f in feeds]


def _timed_probe(manifest: Any, runners: Mapping[str, Any], feeds: list[dict]) -> float:
    """Seconds of one run of ``feeds`` (:func:`_timed_feeds`) on ``runners``."""
    from bgevl.core.registry import get_family
    from bgevl.core.family import run_steps
    from bgevl.runtime.runners import runner_call

    family, graphs, run = get_family(manifest.family), manifest.graph_specs(), runner_call(runners)
    t0 = time.perf_counter()
    for feed in feeds:
        run_steps(family.steps(feed, graphs), run)
    return time.perf_counter() - t0


def open_fastest(manifest: Any, **options: Any) -> tuple[dict, BackendChoice]:
    """The runners of the chosen candidate and the choice. ``options`` (threads, provider, provider_options,
    engine_cache_dir) go to ``open_runners`` for every candidate; OpenVINO candidates are opened without their
    own gate, :func:`_gate` runs the same one."""
    from bgevl.runtime.openvino import open_openvino
    from bgevl.runtime.runners import Runner, close_runners, open_runners

    seconds: dict[str, float] = {}
    refused: dict[str, str] = {}
    opened: dict[str, dict] = {}
    for candidate in candidates(manifest):
        runners = None
        try:
            if candidate.backend == "openvino":
                # OpenVINO's runners are Runners (the dict is only read)
                runners = cast("dict[str, Runner]", open_openvino(
                    manifest, precision=candidate.options["openvino_precision"], threads=options.get("threads"),
                    validate=False))
            else:
                runners = open_runners(manifest, backend=candidate.backend, **options)
            _gate(manifest, runners, candidate)  # the gate's run is the warm-up
        except (BgevlError, ImportError, RuntimeError) as exc:
            refused[candidate.name] = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if runners is not None:  # opened, but it missed its gate
                close_runners(runners)
            continue
        opened[candidate.name] = runners
    feeds = _timed_feeds(manifest) if opened else []
    for _ in range(TIMED_ROUNDS):
        for name, runners in opened.items():
            # a lead-in call first: the candidate timed right after another would run against that one's still
            # spinning threads, on its own sleeping ones (bgevl.benchmarks.measure.interleaved measures this)
            _timed_probe(manifest, runners, feeds[:1])
            elapsed = _timed_probe(manifest, runners, feeds)
            seconds[name] = min(seconds.get(name, elapsed), elapsed)
    try:
        choice = choose(seconds, refused)
    except BgevlError:
        for runners in opened.values():
            close_runners(runners)
        raise
    for name, runners in opened.items():  # the losers' sessions, compiled models and device memory go now
        if name != choice.chosen:
            close_runners(runners)
    log.info("backend 'auto' for %s: %s, %s", manifest.directory.name, choice.chosen, choice.reason)
    return opened[choice.chosen], choice
