"""The export's quality gate: a new export against the fp32 graphs of the same checkpoint, on the user's data.

``bgevl-export --quality-data DIR --max-recall-drop POINTS`` calls :func:`quality_gate` inside the
export's staging directory, after the parity validation and before the final rename: when a recall@k
or mAP@k of the new export falls more than ``POINTS`` percentage points under the fp32 graphs' on the
same items, the export is refused in one line naming the metric and the drop, and nothing is written;
when it passes, the figures go into the manifest's ``quality`` section.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from bgevl.core.errors import BgevlError
from bgevl.quality.data import QualityData
from bgevl.quality.evaluate import EvalOptions, RunSpec, evaluate, worst_drop

#: points of recall@k / mAP@k the new export may lose against the fp32 graphs (``--max-recall-drop``)
DEFAULT_MAX_RECALL_DROP = 1.0


class QualityGateFailed(BgevlError):
    """A retrieval metric of the new export fell under the fp32 graphs' by more than the limit."""


def gate_message(worst: dict[str, Any], max_drop: float, reference: str | None) -> str:
    """One line: which run, task and metric fell, by how much, its interval and the limit."""
    low, high = worst["delta_ci95"]
    return (f"{worst['run']}: {worst['task']} {worst['metric']} fell {-worst['delta']:.2f} points against {reference} "
            f"(95 % interval {low:+.2f} to {high:+.2f}, {worst['queries']} queries), over the limit of {max_drop:g}")


def quality_gate(data: QualityData, export: Path, reference: Path | None, precision: str, max_drop: float,
                 say: Callable[[str], None]) -> dict[str, Any]:
    """Evaluate ``export`` against ``reference`` (the fp32 graphs; None: the export is fp32 itself, whose
    figures are recorded as they are) on ONNX Runtime's CPU provider, as validation runs; raise
    :class:`QualityGateFailed` over ``max_drop`` points; return the manifest's ``quality`` section."""
    runs = [RunSpec(export, provider="cpu", label=precision)]
    if reference is not None:
        runs.insert(0, RunSpec(reference, provider="cpu", label="fp32 graphs"))
    report = evaluate(data, runs, EvalOptions(progress=False), say=say)
    empty = [task for task, body in report["runs"][-1]["tasks"].items() if not body["queries"]]
    if empty or not report["runs"][-1]["tasks"]:
        raise QualityGateFailed(
            f"quality gate (--quality-data {data.location}): nothing to measure for {', '.join(empty) or 'any task'}: "
            f"no query of it could be embedded ({report['excluded']['count']} items excluded as unreadable or invalid; "
            f"bgevl-eval lists them); nothing was written: fix or remove those items, or leave out --quality-data")
    for task, body in report["runs"][-1]["tasks"].items():
        if body["queries"] and 100 / body["queries"] > max_drop:
            say(f"note: {task} has {body['queries']} queries, so one query that changes its answer moves a recall by "
                f"{100 / body['queries']:.2f} points, over the limit of {max_drop:g}: a 1,000-query set resolves 0.1")
    worst = worst_drop(report)
    reference_label = report["reference"] + " of the same checkpoint" if reference is not None else None
    if worst is not None and -worst["delta"] > max_drop:
        raise QualityGateFailed(f"quality gate (--quality-data {data.location}): "
                                f"{gate_message(worst, max_drop, reference_label)}; nothing was written: "
                                f"try another --int8-mode or --calibration-data, or raise --max-recall-drop")
    return {"data": report["data"], "reference": reference_label or "none: the export is fp32",
            "runtime": "onnxruntime CPUExecutionProvider", "max_recall_drop": max_drop, "passed": True,
            "worst_drop": worst, "excluded": report["excluded"]["count"],
            "instructions": report["runs"][-1]["instructions"],
            "figures": {task: body["figures"] + [body["overlap"]] for task, body in report["runs"][-1]["tasks"].items()}}
