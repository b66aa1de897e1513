"""Retrieval metrics on rankings: recall@k, CIRCO's AP@k, top-k overlap, paired bootstrap intervals.

Everything works per query, so two exports evaluated on the same items compare query by query
(a paired difference) and a bootstrap over queries gives the interval of that difference.

* **Ranking** (:func:`rank`): the gallery by descending cosine (the vectors are L2-normalized, so the
  inner product), ties broken by gallery order (a stable sort: the item listed first ranks first), one
  gallery item per query optionally left out (CIRR removes the reference image from its ranking).
* **Recall@k** (:func:`recall_at_k`): 1 when at least one relevant item is in the top k, else 0; the
  mean over queries is the recall of CLIP-like papers and of CLIP_benchmark
  (``(recall_at_k(...) > 0).mean()``), of CIRR (one target) and, given only the first target, CIRCO's.
* **AP@k** (:func:`average_precision_at_k`): CIRCO's definition (``miccunifi/CIRCO``
  ``src/evaluation.py``): ``sum_{j<=k} precision@j * rel_j / min(#relevant, k)``; mAP@k is its mean.
* A query without relevant items has no value (NaN) and is left out of the mean, as trec_eval does;
  the count of queries evaluated is reported beside each figure.
* **Top-k overlap** (:func:`overlap_at_k`): ``|top_k(a) & top_k(b)| / k`` per query: how much of what a
  user sees changes between two exports, whatever the recall.
* **Bootstrap** (:func:`bootstrap_interval`): the percentile interval of the mean over ``resamples``
  resamplings of the queries with replacement, from a seeded generator: the same numbers on every run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

#: queries ranked per block: the score block is queries x gallery float32
RANK_CHUNK = 512
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def rank(queries: np.ndarray, gallery: np.ndarray, k: int, exclude: Sequence[int] | np.ndarray | None = None,
         chunk: int = RANK_CHUNK) -> np.ndarray:
    """The top ``k`` gallery indices of each query, ``[n_queries, k']`` with ``k' = min(k, gallery size
    minus the left-out item)``: descending inner product, ties in gallery order; ``exclude[i]`` (>= 0) is
    a gallery index left out of query i's ranking (-1: none). NaN scores (a broken export) rank last."""
    queries, gallery = np.asarray(queries, np.float32), np.asarray(gallery, np.float32)
    n, size = len(queries), len(gallery)
    excluded = np.full(n, -1, np.int64) if exclude is None else np.asarray(exclude, np.int64)
    width = max(0, min(k, size - (1 if (excluded >= 0).any() else 0)))
    out = np.empty((n, width), np.int64)
    for start in range(0, n, chunk):
        scores = queries[start:start + chunk] @ gallery.T
        scores[np.isnan(scores)] = -np.inf
        # a full stable sort (not argpartition) so that ties are broken the same way at every k
        order = np.argsort(-scores, axis=1, kind="stable")[:, :width + 1]
        if order.shape[1] > width:  # one spare column: the left-out item, or else the last one, goes
            drop = order == excluded[start:start + chunk, None]
            drop[~drop.any(axis=1), -1] = True
            order = order[~drop].reshape(len(order), width)
        out[start:start + chunk] = order
    return out


def rank_compact(queries: np.ndarray, gallery: np.ndarray, k: int, output_type: str, ranges: Any = None,
                 exclude: Sequence[int] | np.ndarray | None = None, rescore: int = 0) -> np.ndarray:
    """:func:`rank` over compact embeddings (``bgevl.core.compact``), the way sentence-transformers'
    ``semantic_search_faiss`` searches them: the queries quantized alike, then a first pass over the whole
    gallery (int8/uint8: the inner product of the codes, FAISS's ``IndexFlatIP`` over them; binary/ubinary:
    the fewest differing bits, ``IndexBinaryFlat``). ``rescore`` > 0: the first pass's top ``k * rescore``
    re-ordered by the float32 query against the gallery's codes (int8/uint8 mapped back to the float range,
    bits as 0/1), as its rescoring does."""
    from bgevl.core.compact import quantize

    width = k * rescore if rescore > 0 else k
    if output_type in ("binary", "ubinary"):
        # the Hamming distance of 0/1 bits q, g is |q| + |g| - 2 q.g: ranking by 2 q.g - |g| is its order
        q_bits, g_bits = (np.unpackbits(quantize(v, "ubinary"), axis=-1).astype(np.float32) for v in (queries, gallery))
        first = rank(np.hstack([2 * q_bits, -np.ones((len(q_bits), 1), np.float32)]),
                     np.hstack([g_bits, g_bits.sum(axis=1, keepdims=True)]), width, exclude)
        candidates = g_bits[:, :queries.shape[1]]
    else:
        codes = quantize(gallery, output_type, ranges).astype(np.float32)
        first = rank(quantize(queries, output_type, ranges).astype(np.float32), codes, width, exclude)
        steps = np.where(ranges.high - ranges.low == 0, 1, (ranges.high - ranges.low) / 255)
        candidates = (codes + (128 if output_type == "int8" else 0)) * steps + ranges.low
    if rescore <= 0:
        return first
    queries = np.asarray(queries, np.float32)
    out = np.empty((len(first), min(k, first.shape[1])), np.int64)
    for start in range(0, len(first), RANK_CHUNK):  # [chunk, k * rescore, dim] at a time, not every query's
        block = first[start:start + RANK_CHUNK]
        scores = np.einsum("qd,qkd->qk", queries[start:start + RANK_CHUNK], candidates[block])
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        out[start:start + RANK_CHUNK] = np.take_along_axis(block, order, axis=1)
    return out


def relevance(ranking: np.ndarray, positives: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """``(rel, n_relevant)``: ``rel[i, j]`` whether the j-th ranked item of query i is relevant to it;
    ``n_relevant[i]`` how many gallery items are (whether ranked or not)."""
    rel = np.zeros(ranking.shape, bool)
    counts = np.zeros(len(ranking), np.int64)
    for i, given in enumerate(positives):
        pos = np.unique(np.asarray(list(given), np.int64))
        counts[i] = len(pos)
        if len(pos):
            rel[i] = np.isin(ranking[i], pos)
    return rel, counts


def recall_at_k(rel: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """Per query: 1.0 if a relevant item is in the top ``k``, else 0.0; NaN without relevant items."""
    hit = rel[:, :k].any(axis=1).astype(np.float64)
    return np.where(n_relevant > 0, hit, np.nan)


def average_precision_at_k(rel: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """Per query: CIRCO's AP@k, ``sum_{j<=k} precision@j * rel_j / min(n_relevant, k)``; NaN without
    relevant items."""
    top = rel[:, :k].astype(np.float64)
    precision = np.cumsum(top, axis=1) / np.arange(1, top.shape[1] + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (precision * top).sum(axis=1) / np.minimum(n_relevant, k)
    return np.where(n_relevant > 0, ap, np.nan)


def overlap_at_k(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """Per query: the share of the top ``k`` of ranking ``a`` that is also in the top ``k`` of ``b``."""
    k = min(k, a.shape[1], b.shape[1])
    if k == 0:
        return np.full(len(a), np.nan)
    return np.array([len(np.intersect1d(x[:k], y[:k])) / k for x, y in zip(a, b)], np.float64)


def chance_recall_at_k(n_relevant: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """Per query: the recall@k of a random ranking, ``1 - C(n - r, k) / C(n, k)`` for ``r`` relevant among ``n``
    candidates (NaN without relevant items): what a figure must be well above to mean anything."""
    out = np.full(len(n_relevant), np.nan)
    for i, (r, n) in enumerate(zip(n_relevant, candidates)):
        if r > 0:
            miss = 1.0
            for j in range(min(k, n)):  # all k picks among the n - r irrelevant ones
                miss *= max(0, n - r - j) / (n - j)
            out[i] = 1.0 - miss
    return out


def bootstrap_interval(values: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                       level: float = 0.95) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of ``values`` (NaN left out): ``resamples`` draws
    of as many values with replacement from ``numpy.random.default_rng(seed)``. (scipy.stats.bootstrap
    does the same; scipy is not a dependency of this package, and the percentile method is 4 lines.)"""
    values = np.asarray(values, np.float64)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 100):  # blocks of draws keep memory at 100 x n
        count = min(100, resamples - start)
        means[start:start + count] = values[rng.integers(0, len(values), (count, len(values)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


@dataclass
class Figure:
    """One metric of one run: the mean over queries (in percent for recall and mAP), its interval, and the
    paired difference to the reference run on the same queries with its interval (``None`` for the
    reference itself)."""

    metric: str
    value: float
    interval: tuple[float, float]
    queries: int
    delta: float | None = None
    delta_interval: tuple[float, float] | None = None
    #: the value a random ranking gets on average (recall), where known
    chance: float | None = None

    def to_json(self) -> dict:
        out = {"metric": self.metric, "value": _round(self.value), "ci95": [_round(v) for v in self.interval],
               "queries": self.queries}
        if self.chance is not None:
            out["chance"] = _round(self.chance)
        if self.delta is not None and self.delta_interval is not None:  # set together (figure())
            out.update(delta=_round(self.delta), delta_ci95=[_round(v) for v in self.delta_interval])
        return out


def _round(value: float) -> float | None:
    return None if value is None or np.isnan(value) else round(float(value), 4) + 0.0  # + 0.0: no -0.0


def figure(metric: str, values: np.ndarray, reference: np.ndarray | None = None, scale: float = 100.0,
           resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> Figure:
    """The :class:`Figure` of per-query ``values`` (and their difference to ``reference``'s per-query
    values, queries where both have one), scaled by ``scale`` (percent)."""
    values = np.asarray(values, np.float64) * scale
    valid = ~np.isnan(values)
    value = float(values[valid].mean()) if valid.any() else float("nan")
    out = Figure(metric, value, bootstrap_interval(values, resamples, seed), int(valid.sum()))
    if reference is not None:
        diff = values - np.asarray(reference, np.float64) * scale
        both = ~np.isnan(diff)
        out.delta = float(diff[both].mean()) if both.any() else float("nan")
        out.delta_interval = bootstrap_interval(diff, resamples, seed)
    return out
