"""Retrieval metrics against a second, independent implementation: hand-made rankings with exact values, ties,
several targets and empty relevance; rankings against FAISS; recall against CLIP_benchmark where it imports."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bgevl.quality import metrics as M


# --- the second implementation: plain Python from the definitions, one query at a time ----------------------
def ref_ranking(scores: list[float], exclude: int | None = None) -> list[int]:
    """Descending score, ties in gallery order, ``exclude`` left out."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    return [j for j in order if j != exclude]


def ref_recall(ranking: list[int], relevant: set[int], k: int) -> float | None:
    if not relevant:
        return None
    return 1.0 if any(j in relevant for j in ranking[:k]) else 0.0


def ref_ap(ranking: list[int], relevant: set[int], k: int) -> float | None:
    """CIRCO's README: AP@k = 1/min(n, k) * sum_{j<=k} P@j * rel(j)."""
    if not relevant:
        return None
    total, hits = 0.0, 0
    for j, item in enumerate(ranking[:k], 1):
        if item in relevant:
            hits += 1
            total += hits / j
    return total / min(len(relevant), k)


def mean(values):
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept)


# --- hand-made rankings, exact values ---------------------------------------------------------------------------
RANKINGS = np.array([[3, 1, 2, 0, 4],
                     [0, 1, 2, 3, 4],
                     [4, 3, 2, 1, 0],
                     [2, 0, 4, 1, 3]])
POSITIVES = [[1], [1, 3], [0, 1, 2], []]


def test_recall_at_k_exact_values_and_empty_relevance():
    rel, count = M.relevance(RANKINGS, POSITIVES)
    assert count.tolist() == [1, 2, 3, 0]
    r1 = M.recall_at_k(rel, count, 1)
    assert r1[:3].tolist() == [0.0, 0.0, 0.0] and math.isnan(r1[3])
    assert M.recall_at_k(rel, count, 2)[:3].tolist() == [1.0, 1.0, 0.0]
    assert M.recall_at_k(rel, count, 3)[:3].tolist() == [1.0, 1.0, 1.0]
    fig = M.figure("R@2", M.recall_at_k(rel, count, 2))
    assert fig.queries == 3 and fig.value == pytest.approx(200 / 3)  # the query without relevant items is left out


def test_circo_average_precision_exact_values():
    rel, count = M.relevance(RANKINGS, POSITIVES)
    # query 0: relevant at rank 2 -> (1/2) / min(1, 5)
    # query 1: relevant at ranks 2 and 4 -> (1/2 + 2/4) / 2 = 0.5; @2: (1/2) / 2 = 0.25
    # query 2: relevant at ranks 3, 4, 5 -> (1/3 + 2/4 + 3/5) / 3; @2: 0 / 2
    ap5 = M.average_precision_at_k(rel, count, 5)
    assert ap5[:3] == pytest.approx([0.5, 0.5, (1 / 3 + 2 / 4 + 3 / 5) / 3]) and math.isnan(ap5[3])
    ap2 = M.average_precision_at_k(rel, count, 2)
    assert ap2[:3] == pytest.approx([0.5, 0.25, 0.0])
    # more targets than k: the denominator is k (CIRCO's min(len(gt), k)), so a perfect top k scores 1
    rel, count = M.relevance(np.array([[0, 1, 2, 3]]), [[0, 1, 2]])
    assert M.average_precision_at_k(rel, count, 2).tolist() == [1.0]
    assert M.average_precision_at_k(rel, count, 4).tolist() == [1.0]


def test_duplicate_targets_count_once():
    rel, count = M.relevance(np.array([[5, 1, 0]]), [[1, 1, 1]])
    assert count.tolist() == [1] and M.average_precision_at_k(rel, count, 3).tolist() == [0.5]


def test_ties_rank_in_gallery_order_and_the_reference_is_left_out():
    # integer vectors: the scores are exact in float32, so ties are real ties
    gallery = np.array([[1, 0], [1, 0], [0, 1], [1, 0], [0, 0]], np.float32)
    queries = np.array([[1, 0], [0, 1], [1, 1]], np.float32)
    ranking = M.rank(queries, gallery, 5)
    assert ranking.tolist() == [[0, 1, 3, 2, 4], [2, 0, 1, 3, 4], [0, 1, 2, 3, 4]]
    left_out = M.rank(queries, gallery, 5, exclude=[0, -1, 2])
    assert left_out.tolist() == [[1, 3, 2, 4], [2, 0, 1, 3], [0, 1, 3, 4]]  # k' = gallery - 1 for every row
    assert M.rank(queries, gallery, 2, exclude=[1, 2, 4]).tolist() == [[0, 3], [0, 1], [0, 1]]
    for q, row in zip(queries, M.rank(queries, gallery, 5)):
        assert row.tolist() == ref_ranking([float(q @ g) for g in gallery])


def test_nan_scores_rank_last():
    gallery = np.array([[1, 0], [np.nan, 0], [0.5, 0]], np.float32)
    assert M.rank(np.array([[1, 0]], np.float32), gallery, 3).tolist() == [[0, 2, 1]]


def test_against_the_second_implementation_on_random_rankings():
    rng = np.random.default_rng(3)
    n_queries, size = 200, 40
    queries = rng.normal(size=(n_queries, 8)).astype(np.float32)
    gallery = rng.normal(size=(size, 8)).astype(np.float32)
    gallery[7] = gallery[3]  # exact duplicates: tied scores for every query
    positives = [sorted(rng.choice(size, size=int(rng.integers(0, 6)), replace=False).tolist()) for _ in range(n_queries)]
    exclude = rng.integers(-1, size, n_queries)
    ranking = M.rank(queries, gallery, 25, exclude, chunk=64)  # several blocks
    rel, count = M.relevance(ranking, positives)
    scores = (queries @ gallery.T).tolist()
    expected_rankings = [ref_ranking(s, int(e) if e >= 0 else None) for s, e in zip(scores, exclude)]
    assert [r.tolist() for r in ranking] == [r[:25] for r in expected_rankings]
    for k in (1, 5, 10, 25):
        ours_r = M.recall_at_k(rel, count, k)
        ours_ap = M.average_precision_at_k(rel, count, k)
        for i in range(n_queries):
            want_r = ref_recall(expected_rankings[i], set(positives[i]), k)
            want_ap = ref_ap(expected_rankings[i], set(positives[i]), k)
            assert (math.isnan(ours_r[i]) and want_r is None) or ours_r[i] == want_r
            assert (math.isnan(ours_ap[i]) and want_ap is None) or ours_ap[i] == pytest.approx(want_ap, abs=1e-12)
        assert M.figure("x", ours_ap, scale=1).value == pytest.approx(
            mean([ref_ap(r, set(p), k) for r, p in zip(expected_rankings, positives)]), abs=1e-12)


def test_ranking_agrees_with_faiss():
    faiss = pytest.importorskip("faiss", reason="faiss-cpu (the test extra) is not installed")
    rng = np.random.default_rng(5)
    gallery = rng.normal(size=(300, 16)).astype(np.float32)
    queries = rng.normal(size=(50, 16)).astype(np.float32)
    index = faiss.IndexFlatIP(16)
    index.add(gallery)
    _, expected = index.search(queries, 10)
    assert np.array_equal(M.rank(queries, gallery, 10), expected)


def test_chance_recall_against_enumerating_every_ranking():
    import itertools

    n, r = 7, 2
    relevant = set(range(r))
    for k in (1, 3, 6, 7, 9):
        tops = list(itertools.combinations(range(n), min(k, n)))
        want = sum(bool(relevant & set(top)) for top in tops) / len(tops)
        assert M.chance_recall_at_k(np.array([r]), np.array([n]), k)[0] == pytest.approx(want, abs=1e-12)
    assert math.isnan(M.chance_recall_at_k(np.array([0]), np.array([n]), 3)[0])


def test_overlap_and_paired_bootstrap():
    a = np.array([[0, 1, 2], [3, 4, 5]])
    b = np.array([[2, 1, 9], [6, 7, 8]])
    assert M.overlap_at_k(a, b, 3).tolist() == [2 / 3, 0.0]
    assert M.overlap_at_k(a, b, 1).tolist() == [0.0, 0.0]
    values = np.array([1.0, 0.0, 1.0, 1.0, np.nan, 0.0, 1.0, 1.0])
    same = M.figure("R@1", values, values)
    assert same.delta == 0.0 and same.delta_interval == (0.0, 0.0)
    low, high = same.interval
    assert low < same.value < high and same.queries == 7
    # the interval is a function of the seed alone: the same numbers on every run
    worse = values.copy()
    worse[[0, 2]] = 0.0
    first, second = M.figure("R@1", worse, values, seed=11), M.figure("R@1", worse, values, seed=11)
    assert first.delta == pytest.approx(-200 / 7) and first.delta_interval == second.delta_interval
    assert first.delta_interval[0] < first.delta < first.delta_interval[1] <= 0.0


def test_recall_agrees_with_clip_benchmark():
    """CLIP_benchmark's ``recall_at_k`` (``(recall > 0).mean()``, its reported recall) on the same embeddings:
    text->image with one image per caption, image->text with several captions per image."""
    zr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval",
                             reason="clip-benchmark is not installed (pip install clip-benchmark: it installs beside "
                                    "this package's pins, with open_clip_torch and torchvision)")
    import torch

    rng = np.random.default_rng(9)
    images = rng.normal(size=(60, 12)).astype(np.float32)
    caption_image = np.repeat(np.arange(60), rng.integers(1, 4, 60))  # one to three captions per image
    texts = (images[caption_image] + rng.normal(scale=1.5, size=(len(caption_image), 12))).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    scores = torch.from_numpy(texts @ images.T)
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(texts)), torch.from_numpy(caption_image)] = True
    for k in (1, 5, 10):
        t2i = (zr.batchify(zr.recall_at_k, scores, positive, 16, "cpu", k=k) > 0).float().mean().item()
        i2t = (zr.batchify(zr.recall_at_k, scores.T, positive.T, 16, "cpu", k=k) > 0).float().mean().item()
        rel, count = M.relevance(M.rank(texts, images, k), [[int(i)] for i in caption_image])
        ours_t2i = M.recall_at_k(rel, count, k).mean()
        rel, count = M.relevance(M.rank(images, texts, k), [np.flatnonzero(caption_image == i) for i in range(60)])
        ours_i2t = M.recall_at_k(rel, count, k).mean()
        assert ours_t2i == pytest.approx(t2i, abs=1e-6) and ours_i2t == pytest.approx(i2t, abs=1e-6)
        assert 0 < t2i < 1 and 0 < i2t < 1  # neither trivial: the comparison can fail
