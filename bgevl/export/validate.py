"""Parity of exported graphs against the PyTorch reference on the fixed probe set.

Figures, per graph and for composed queries:

* ``min_cosine`` / ``mean_cosine``: cosine similarity of each exported embedding to the
  PyTorch fp32 embedding of the same input;
* ``max_abs_diff``: largest element-wise difference of the (normalized) embeddings;
* ``top1_agreement``: the fraction of probe queries whose top-1 retrieval result is the same
  with the exported embedding as with the reference one. Queries are the graph's outputs;
  the gallery is the reference embeddings of the other modality (images retrieve texts, texts
  and composed queries retrieve images).
"""

from __future__ import annotations

import numpy as np

from bgevl.errors import ValidationFailed
from bgevl.fusion import l2_normalize
from bgevl.specs import COSINE_THRESHOLDS


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(l2_normalize(a) * l2_normalize(b), axis=-1)


def retrieval_agreement(test_queries: np.ndarray, ref_queries: np.ndarray, ref_gallery: np.ndarray) -> float:
    test_top = np.argmax(l2_normalize(test_queries) @ ref_gallery.T, axis=1)
    ref_top = np.argmax(l2_normalize(ref_queries) @ ref_gallery.T, axis=1)
    return float(np.mean(test_top == ref_top))


def parity_figures(test: np.ndarray, ref: np.ndarray, ref_gallery: np.ndarray) -> dict:
    test = np.asarray(test, dtype=np.float32)
    ref = np.asarray(ref, dtype=np.float32)
    if test.shape != ref.shape:
        raise ValueError(f"shape mismatch: exported {test.shape} vs reference {ref.shape}")
    if not np.all(np.isfinite(test)):
        return {"min_cosine": float("nan"), "mean_cosine": float("nan"), "max_abs_diff": float("inf"),
                "top1_agreement": 0.0, "n": int(len(test)), "non_finite": True}
    cos = cosine_rows(test, ref)
    return {
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
        "max_abs_diff": float(np.max(np.abs(test - ref))),
        "top1_agreement": float(retrieval_agreement(test, ref, ref_gallery)),
        "n": int(len(test)),
    }


def threshold_for(precision: str, override: float | None = None) -> float:
    return float(override) if override is not None else COSINE_THRESHOLDS[precision]


def check_thresholds(figures: dict[str, dict], precision: str, threshold: float, weights: str) -> dict:
    """Compare each entry's min cosine with the threshold; raise with all figures on failure."""
    failed = {name: f for name, f in figures.items() if not (f["min_cosine"] >= threshold)}
    summary = {
        "threshold_min_cosine": threshold,
        "passed": not failed,
        "weights": weights,
    }
    if weights == "random":
        summary["note"] = (
            "random weights: the thresholds are set for pretrained checkpoints; these figures measure "
            "the export's numerics on an untrained network of the same architecture"
        )
    if failed:
        raise ValidationFailed(
            f"{precision} export failed validation (min cosine must be >= {threshold}):\n"
            + format_figures(figures)
            + "\nThe artifacts were not written. Check the precision settings, calibrate INT8 on real data with "
              "--calibration-data DIR, or pass --no-validate to write them anyway."
        )
    return summary


def format_figures(figures: dict[str, dict]) -> str:
    lines = [f"  {'graph':<10} {'min cos':>10} {'mean cos':>10} {'max|diff|':>10} {'top-1 agr':>10}"]
    for name, f in figures.items():
        lines.append(
            f"  {name:<10} {f['min_cosine']:>10.6f} {f['mean_cosine']:>10.6f} {f['max_abs_diff']:>10.2e} "
            f"{f['top1_agreement']:>10.2%}"
        )
    return "\n".join(lines)
