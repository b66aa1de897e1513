"""Compact embeddings (``bgevl.core.compact``) against sentence-transformers' own ``quantize_embeddings`` and
torch's bfloat16, on unit vectors like the models' and on values outside the calibration ranges."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from bgevl.core.compact import OUTPUT_TYPES, EmbeddingRanges, quantize, to_base64
from bgevl.core.errors import BgevlError
from bgevl.core.vectors import l2_normalize

st_quantization = pytest.importorskip("sentence_transformers.util.quantization",
                                      reason="sentence-transformers is not installed (pip install '.[test]')")


def _vectors(n: int, dim: int = 64, seed: int = 0) -> np.ndarray:
    return l2_normalize(np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32))


@pytest.mark.parametrize("output_type", ["int8", "uint8", "binary", "ubinary", "float32"])
def test_every_type_is_sentence_transformers_quantize_embeddings(output_type):
    calibration, corpus = _vectors(200, seed=1), _vectors(50, seed=2)
    corpus[0, :4] = [2.0, -2.0, 0.0, 1e-9]  # outside the calibration ranges, and the sign bit's edge
    ranges = EmbeddingRanges.of(calibration, "test")
    want = st_quantization.quantize_embeddings(corpus, output_type, ranges=ranges.array)
    got = quantize(corpus, output_type, ranges)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    # without explicit ranges sentence-transformers calibrates on the calibration embeddings the same way
    if output_type.endswith("int8"):
        np.testing.assert_array_equal(got, st_quantization.quantize_embeddings(corpus, output_type,
                                                                                calibration_embeddings=calibration))


def test_float16_and_bfloat16_are_torch_s_conversions():
    vectors = _vectors(20)
    vectors[0, :3] = [1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8)]  # ties: rounded to the even neighbour
    np.testing.assert_array_equal(quantize(vectors, "float16"), torch.from_numpy(vectors).half().numpy())
    want = torch.from_numpy(vectors).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(quantize(vectors, "bfloat16"), want)


def test_base64_is_little_endian_bytes_of_the_type():
    vector = quantize(_vectors(1), "float16")[0]
    assert np.array_equal(np.frombuffer(base64.b64decode(to_base64(vector)), "<f2"), vector)
    packed = quantize(_vectors(1), "ubinary")[0]
    assert base64.b64decode(to_base64(packed)) == packed.tobytes() and len(packed) == 8


def test_ranges_round_trip_and_refusals(tmp_path):
    ranges = EmbeddingRanges.of(_vectors(10), "ten vectors")
    path = ranges.save(tmp_path)
    back = EmbeddingRanges.load(tmp_path)
    assert path.name == "embedding_ranges.json" and back is not None and back.source == "ten vectors" and back.count == 10
    np.testing.assert_array_equal(back.array, ranges.array)
    assert EmbeddingRanges.load(tmp_path / "nowhere") is None
    with pytest.raises(BgevlError, match="int8 embeddings need calibration ranges; compute them once with 'bgevl-export ranges"):
        quantize(_vectors(2), "int8")
    with pytest.raises(BgevlError, match="of 64 dimensions, the embeddings of 32"):
        quantize(_vectors(2, dim=32), "uint8", ranges)
    with pytest.raises(BgevlError, match="need two embeddings or more"):
        EmbeddingRanges.of(_vectors(1), "one")
    with pytest.raises(BgevlError, match="choose one of " + ", ".join(OUTPUT_TYPES)):
        quantize(_vectors(2), "int4")


@pytest.mark.parametrize("dtype", ["int8", "ubinary", "float16"])
def test_bgevl_embed_stores_the_corpus_as_the_api_quantizes_queries(dtype, export_dir, tmp_path):
    """bgevl-export ranges, then bgevl-embed --embedding-dtype: clip-retrieval's .npy and the Parquet table of that
    type, each row the runtime's vector quantized with the export's ranges, and the ranges beside them."""
    import json
    import shutil

    import pyarrow.parquet as pq
    from PIL import Image

    from bgevl.corpus.cli import main as embed_main
    from bgevl.export.cli import main as export_main
    from bgevl.runtime import Embedder

    export = tmp_path / "export"
    shutil.copytree(export_dir("fp32"), export)
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "corpus"
    if dtype == "int8":  # without ranges: refused in one line, nothing written
        assert embed_main(["--export", str(export), "--input", str(folder), "--output", str(out), "--embedding-dtype",
                           "int8", "--quiet"]) == 2
        assert not out.exists()
    assert export_main(["ranges", str(export), "--data", str(folder), "--size", "8"]) == 2  # images without captions
    (folder / "captions.txt").write_text("a red square\na blue circle\n")
    assert export_main(["ranges", str(export), "--data", str(folder)]) == 0
    assert embed_main(["--export", str(export), "--input", str(folder), "--output", str(out), "--embedding-dtype", dtype,
                       "--quiet"]) == 0
    ranges = EmbeddingRanges.load(export)
    assert ranges is not None and ranges.count == 6 + 2
    with Embedder.load(export, provider="cpu") as embedder:
        want = quantize(embedder.encode(images=sorted(str(p) for p in folder.glob("*.png"))), dtype, ranges)
    stored = np.load(out / "img_emb" / "img_emb_00000.npy")
    assert stored.dtype == want.dtype
    np.testing.assert_array_equal(stored, want)
    table = pq.read_table(out / "embeddings" / "part_00000.parquet")
    np.testing.assert_array_equal(np.array(table.column("embedding").to_pylist(), want.dtype), want)
    assert json.loads((out / "manifest.json").read_text())["dtype"] == dtype
    faiss = pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install '.[test]')")
    if dtype == "ubinary":  # FAISS's binary index reads the packed codes as they are stored
        index = faiss.IndexBinaryFlat(stored.shape[1] * 8)
        index.add(stored)
        assert index.ntotal == len(stored) and index.search(stored[:1], 1)[1][0, 0] == 0
    else:  # a flat inner-product index over the codes (sentence-transformers' int8/uint8 search)
        index = faiss.IndexFlatIP(stored.shape[1])
        index.add(stored.astype(np.float32))
        assert index.ntotal == len(stored)
    if dtype == "int8":  # the ranges a query must be quantized with, beside the vectors
        assert (out / "embedding_ranges.json").read_text() == (export / "embedding_ranges.json").read_text()
    else:
        assert not (out / "embedding_ranges.json").exists()


@pytest.mark.parametrize("output_type", ["uint8", "ubinary"])
@pytest.mark.parametrize("rescore", [0, 3])
def test_compact_ranking_is_sentence_transformers_faiss_search(output_type, rescore):
    """bgevl-eval's first pass over compact codes and its float32 rescoring give sentence-transformers'
    semantic_search_faiss's results (exact FAISS indexes), in the same order."""
    pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install '.[test]')")
    from bgevl.quality.metrics import rank_compact

    rng = np.random.default_rng(0)
    base = rng.standard_normal((1, 64)).astype(np.float32)
    gallery = l2_normalize(base + 0.7 * rng.standard_normal((300, 64)).astype(np.float32))
    queries = l2_normalize(base + 0.7 * rng.standard_normal((40, 64)).astype(np.float32))
    ranges = EmbeddingRanges.of(gallery, "gallery")
    results, _ = st_quantization.semantic_search_faiss(
        queries, corpus_embeddings=quantize(gallery, output_type, ranges), corpus_precision=output_type, top_k=10,
        ranges=ranges.array, rescore=rescore > 0, rescore_multiplier=max(rescore, 1), exact=True)
    want = np.array([[hit["corpus_id"] for hit in hits] for hits in results])
    np.testing.assert_array_equal(rank_compact(queries, gallery, 10, output_type, ranges, rescore=rescore), want)


def test_bgevl_eval_measures_recall_of_compact_embeddings_with_and_without_rescoring(export_dir, tmp_path):
    import json
    import shutil

    from bgevl.export.cli import main as export_main
    from bgevl.quality.cli import main as eval_main
    from bgevl.quality.synthetic import write_quality_data

    export = tmp_path / "export"
    shutil.copytree(export_dir("fp32"), export)
    write_quality_data(str(tmp_path / "data"), bases=8, variants=2, pairs=16)
    # --max-recall-drop gates exports, not the loss a compact type is measured for
    args = ["--export", str(export), "--data", str(tmp_path / "data"), "--embedding-dtype", "int8,binary",
            "--json", str(tmp_path / "report.json"), "--max-recall-drop", "0", "--quiet"]
    assert eval_main(args) == 2  # int8 without the export's ranges: refused in one line
    assert export_main(["ranges", str(export), "--size", "16"]) == 0
    assert eval_main(args) == 0
    runs = json.loads((tmp_path / "report.json").read_text())["runs"]
    labels = [run["label"] for run in runs]
    assert labels == ["export", "export as int8", "export as int8, rescored x4", "export as binary",
                      "export as binary, rescored x4"]
    assert [run.get("embedding_dtype") for run in runs] == [None, "int8", "int8", "binary", "binary"]
    for run in runs:
        assert set(run["tasks"]) == {"t2i", "i2t", "composed"}
        for task in run["tasks"].values():
            assert all(0 <= f["value"] <= 100 for f in task["figures"])
