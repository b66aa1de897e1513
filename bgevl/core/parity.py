"""Parity of exported graphs against the original's fp32 embeddings (each family's ``reference``) on the fixed probe set.

The exported graphs run through the family's own recipe (``Family.steps``), the one the runtime
and the Triton entry model use, on the family's probe requests. Figures, per kind of item
(image-only, text-only, composed):

* ``min_cosine`` / ``mean_cosine``: cosine similarity of each exported embedding to the
  original's fp32 embedding of the same input;
* ``max_abs_diff``: largest element-wise difference of the (normalized) embeddings;
* ``max_cosine_between_probes``: the largest cosine between the embeddings of two different
  probes (the sanity gate: above ``DISTINCT_PROBES_MAX_COSINE`` the export fails);
* ``top1_agreement``: the fraction of probe queries whose top-1 retrieval result is the same
  with the exported embedding as with the reference one. Queries are the graph's outputs;
  the gallery is the reference embeddings of the other modality (images retrieve texts, texts
  and composed queries retrieve images).

The probe feeds and the original's embeddings are saved beside the graphs (``validation.npz``),
so artifacts built later from the export (TensorRT engines, on a GPU machine that may have neither
torch nor the checkpoint) are validated on the same inputs against the same reference with the
same thresholds, by the same :func:`parity` over other runners.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

from bgevl.core.errors import ValidationFailed
from bgevl.core.family import IMAGE, KINDS, TEXT, Call, Recipe, run_steps
from bgevl.core.specs import COSINE_THRESHOLDS, GraphSpec
from bgevl.core.vectors import l2_normalize


def cosine_rows(a: NDArray[Any], b: NDArray[Any]) -> NDArray[Any]:
    cosines: NDArray[Any] = np.sum(l2_normalize(a) * l2_normalize(b), axis=-1)
    return cosines


def retrieval_agreement(test_queries: NDArray[Any], ref_queries: NDArray[Any], ref_gallery: NDArray[Any]) -> float:
    test_top = np.argmax(l2_normalize(test_queries) @ ref_gallery.T, axis=1)
    ref_top = np.argmax(l2_normalize(ref_queries) @ ref_gallery.T, axis=1)
    return float(np.mean(test_top == ref_top))


#: Sanity gate: two different probe inputs whose embeddings have a cosine above this are "the
#: same embedding" (a tokenizer that maps every text to the same ids gives 1.0 to float precision).
#: Different probes of untrained tiny models stay below 0.9995 (measured: CLIP about 0.99, the tiny
#: LLaVA-NeXT about 0.998).
DISTINCT_PROBES_MAX_COSINE = 0.99999


def max_cosine_between_rows(embeddings: NDArray[Any]) -> float | None:
    """The largest cosine between two different rows (inputs that are all distinct); None for one row."""
    x = l2_normalize(np.asarray(embeddings, dtype=np.float64))
    if len(x) < 2:
        return None
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    return float(sims.max())


def sanity_problem(name: str, embeddings: NDArray[Any]) -> str | None:
    """Why ``embeddings`` of distinct probe inputs cannot be right (NaN/Inf, or two the same), or None."""
    if not np.all(np.isfinite(embeddings)):
        return f"{name}: NaN or Inf in the embeddings"
    top = max_cosine_between_rows(embeddings)
    if top is not None and top > DISTINCT_PROBES_MAX_COSINE:
        return (f"{name}: different probe inputs give the same embedding (cosine {top:.7f}); the weights or the "
                f"tokenizer/processor files are degenerate")
    return None


def check_reference(named: Mapping[str, NDArray[Any]]) -> None:
    """The sanity gate on the reference embeddings themselves, before any export is compared with them."""
    problems = [p for name, emb in named.items() if (p := sanity_problem(name, emb))]
    if problems:
        raise ValidationFailed("the fp32 reference fails the sanity gate: " + "; ".join(problems)
                               + ". Check the checkpoint (bgevl-export check --model-path DIR)")


def parity_figures(test: NDArray[Any], ref: NDArray[Any], ref_gallery: NDArray[Any]) -> dict[str, Any]:
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
        "max_cosine_between_probes": max_cosine_between_rows(test),
        "n": int(len(test)),
    }


def threshold_for(precision: str, override: float | None = None) -> float:
    return float(override) if override is not None else COSINE_THRESHOLDS[precision]


def check_thresholds(figures: dict[str, dict[str, Any]], precision: str, threshold: float, weights: str) -> dict[str, Any]:
    """Compare each entry's min cosine with the threshold; raise with all figures on failure."""
    failed = {name: f for name, f in figures.items()
              if not (f["min_cosine"] >= threshold) or (f.get("max_cosine_between_probes") or -1.0) > DISTINCT_PROBES_MAX_COSINE}
    summary: dict[str, Any] = {
        "threshold_min_cosine": threshold,
        "passed": not failed,
        "weights": weights,
        "note": None,
    }
    if weights == "random":
        summary["note"] = (
            "random weights: the thresholds are set for pretrained checkpoints; these figures measure "
            "the export's numerics on an untrained network of the same architecture"
        )
    if failed:
        same = [n for n, f in failed.items() if (f.get("max_cosine_between_probes") or -1.0) > DISTINCT_PROBES_MAX_COSINE]
        raise ValidationFailed(
            f"{precision} export failed validation (min cosine must be >= {threshold}"
            + (f"; {', '.join(same)}: different probe inputs give the same embedding" if same else "") + "):\n"
            + format_figures(figures)
            + "\nThe artifacts were not written. Check the precision settings, calibrate INT8 on real data with "
              "--calibration-data DIR, or pass --no-validate to write them anyway."
        )
    return summary


def format_figures(figures: dict[str, dict[str, Any]]) -> str:
    lines = [f"  {'kind':<10} {'min cos':>10} {'mean cos':>10} {'max|diff|':>10} {'top-1 agr':>10} {'probe-max cos':>14}"]
    for name, f in figures.items():
        lines.append(
            f"  {name:<10} {f['min_cosine']:>10.6f} {f['mean_cosine']:>10.6f} {f['max_abs_diff']:>10.2e} "
            f"{f['top1_agreement']:>10.2%} {f.get('max_cosine_between_probes') or float('nan'):>14.6f}"
        )
    return "\n".join(lines)


VALIDATION_ARRAYS = "validation.npz"


def reference_arrays(requests_feeds: Sequence[Mapping[str, NDArray[Any]]], kinds: Sequence[Sequence[str]],
                     reference: Sequence[NDArray[Any]]) -> dict[str, NDArray[Any]]:
    """The probe requests' feeds (this project's preprocessing), each item's kind and the original's
    embeddings of the same items, after the sanity gate on the latter."""
    ref = np.concatenate([np.asarray(r, np.float32) for r in reference])
    flat = np.array([k for ks in kinds for k in ks])
    plural = {IMAGE: "images", TEXT: "texts"}
    check_reference({f"reference {plural.get(kind, kind)}": ref[flat == kind] for kind in KINDS if np.any(flat == kind)})
    arrays = {f"request{i}/{k}": v for i, feed in enumerate(requests_feeds) for k, v in feed.items()}
    arrays["ref/embeddings"], arrays["kinds"] = ref, flat
    return arrays


def parity(family: Recipe, graphs: Mapping[str, GraphSpec], arrays: Mapping[str, NDArray[Any]],
           run: Callable[[Call], dict[str, NDArray[Any]]]) -> dict[str, dict[str, Any]]:
    """Figures per kind of item: every probe request's feeds through ``family``'s recipe with the graph
    runner ``run`` (``bgevl.runtime.runners.runner_call``), against the original's embeddings."""
    got, i = [], 0
    while any(k.startswith(f"request{i}/") for k in arrays):
        prefix = f"request{i}/"
        feeds = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
        got.append(np.asarray(run_steps(family.steps(feeds, graphs), run), np.float32))
        i += 1
    got_all, ref, kinds = np.concatenate(got), arrays["ref/embeddings"], arrays["kinds"]
    figures: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        sel = kinds == kind.value
        if not np.any(sel):
            continue
        gallery = ref[kinds == (TEXT if kind == IMAGE else IMAGE)]
        figures[kind] = parity_figures(got_all[sel], ref[sel], gallery)
    return figures


def save_arrays(path: str | os.PathLike[str], arrays: Mapping[str, NDArray[Any]]) -> None:
    np.savez(path, **arrays)


def load_arrays(path: str | os.PathLike[str]) -> dict[str, NDArray[Any]]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
