"""bgevl-embed: a generated corpus as a folder, a table and WebDataset shards; vectors against Embedder.encode,
failures, resume after SIGKILL, clip-retrieval's layout read back with numpy/pyarrow and indexed with FAISS."""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bgevl.corpus import CorpusOptions, embed_corpus
from bgevl.corpus.synthetic import make_items, write_folder, write_shards, write_table
from bgevl.errors import BgevlError
from bgevl.runtime import Embedder

N_ITEMS = 600  # the slow variant runs 3000
BAD_EVERY = 40  # 15 bad images: corrupt, empty and bomb in turn
REPO = Path(__file__).resolve().parents[1]


def read_output(out: Path) -> dict:
    """The output as clip-retrieval's readers see it: .npy and metadata in sorted path order, concatenated."""
    import pyarrow.parquet as pq

    data = {"manifest": json.loads((out / "manifest.json").read_text())}
    for kind, folder in (("image", "img_emb"), ("text", "text_emb"), ("composed", "composed_emb")):
        files = sorted(glob.glob(str(out / folder / "*.npy")))
        if files:
            data[kind] = np.concatenate([np.load(f) for f in files])
    metadata = sorted(glob.glob(str(out / "metadata" / "*.parquet")))
    data["metadata"] = __import__("pandas").concat([pq.read_table(f).to_pandas() for f in metadata], ignore_index=True)
    failures = sorted(glob.glob(str(out / "failures" / "*.parquet")))
    data["failures"] = pq.read_table(out / "failures").to_pandas() if failures else None
    data["table"] = pq.read_table(out / "embeddings").to_pandas()
    return data


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


@pytest.fixture(scope="module")
def export(export_dir):
    return export_dir("fp32")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    items = make_items(N_ITEMS, bad_every=BAD_EVERY)
    return {"items": items, "folder": write_folder(root / "folder", items),
            "table": write_table(root / "table" / "items.parquet", items),
            "shards": write_shards(root / "shards", items, per_shard=256)[0].parent}


@pytest.fixture(scope="module")
def reference(export, corpus):
    """Embedder.encode on the good items' bytes and captions, by item index."""
    embedder = Embedder.load(export)
    good = [i for i, item in enumerate(corpus["items"]) if item.bad is None]
    return {"good": good,
            "image": dict(zip(good, embedder.encode(images=[corpus["items"][i].data for i in good]))),
            "text": dict(zip(good, embedder.encode(text=[corpus["items"][i].caption for i in good])))}


def index_of(layout: str, item_id: str) -> int:
    """The generated item's index from the id each layout gives it."""
    if layout == "folder":  # dNN/<key>.jpg
        return int(Path(item_id).stem)
    if layout == "table":  # row-<key>
        return int(item_id.split("-")[1])
    return int(item_id[:5]) * 256 + int(item_id[5:])  # shard and index in shard


@pytest.fixture(scope="module")
def outputs(export, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    done = {}
    for layout in ("folder", "table", "shards"):
        summary = embed_corpus(CorpusOptions(export=export, input=str(corpus[layout]), output=str(root / layout),
                                             partition_size=250, batch_size=32, workers=2, progress=False))
        done[layout] = (root / layout, summary)
    return done


@pytest.mark.parametrize("layout", ["folder", "table", "shards"])
def test_vectors_equal_embedder_encode_and_bad_images_are_the_failures(layout, outputs, corpus, reference):
    out, summary = outputs[layout]
    data = read_output(out)
    bad = {i: item.bad for i, item in enumerate(corpus["items"]) if item.bad}
    assert summary["embedded"] == len(reference["good"]) == N_ITEMS - len(bad)
    assert summary["failed"] == len(bad) and summary["skipped"] == 0 and summary["partitions"] == 3
    ids = list(data["metadata"]["id"])
    failed = list(data["failures"]["id"])
    assert len(ids) + len(failed) == N_ITEMS and len(set(ids) | set(failed)) == N_ITEMS  # every id exactly once
    assert sorted(index_of(layout, f) for f in failed) == sorted(bad)
    for item_id, reason in zip(failed, data["failures"]["reason"]):
        want = {"corrupt": "corrupt or truncated", "empty": "empty byte string", "bomb": "decompression-bomb"}
        assert want[bad[index_of(layout, item_id)]] in reason and "\n" not in reason
    order = [index_of(layout, i) for i in ids]
    for kind in ("image", "text"):
        want = np.stack([reference[kind][i] for i in order])
        assert data[kind].dtype == np.float32 and data[kind].shape == want.shape
        assert cosines(data[kind], want).min() >= 0.9999
    assert list(data["metadata"]["caption"]) == [corpus["items"][i].caption for i in order]
    # the Parquet table: the same ids and vectors in the same order
    assert list(data["table"]["id"]) == ids
    np.testing.assert_allclose(np.stack(data["table"]["image_embedding"].to_numpy()), data["image"], atol=0)
    assert data["manifest"]["complete"] and data["manifest"]["counts"]["failed"] == len(bad)


def test_table_and_shard_metadata_columns_are_carried(outputs, corpus):
    table = read_output(outputs["table"][0])["metadata"]
    assert list(table.columns) == ["id", "image_path", "caption", "shade"]
    assert all(table["shade"] == [int(i.split("-")[1]) % 5 for i in table["id"]])
    shards = read_output(outputs["shards"][0])["metadata"]
    assert list(shards.columns)[:3] == ["id", "image_path", "caption"] and {"url", "key", "status"} <= set(shards.columns)
    assert all(shards["key"] == shards["id"]) and shards["image_path"][0].endswith("00000.tar#000000000")


def test_clip_retrieval_layout_builds_a_faiss_index_that_finds_each_items_own_caption(outputs, corpus, reference):
    """numpy/pyarrow in clip-retrieval's order (sorted files, row i of metadata = row i of the .npy); a flat inner
    product index (what autofaiss builds for small sets) queried with each image's own Embedder.encode vector
    returns its own row, whose caption is the image's caption; texts likewise."""
    faiss = pytest.importorskip("faiss", reason="faiss-cpu is in the 'test' extra")
    data = read_output(outputs["folder"][0])
    for kind in ("image", "text"):
        index = faiss.IndexFlatIP(data[kind].shape[1])
        index.add(np.ascontiguousarray(data[kind], dtype=np.float32))
        good = reference["good"]
        queries = np.stack([reference[kind][i] for i in good]).astype(np.float32)
        _, rows = index.search(queries, 5)
        captions = data["metadata"]["caption"].to_numpy()
        hits = [corpus["items"][i].caption in set(captions[r]) for i, r in zip(good, rows)]
        top1 = [captions[r[0]] == corpus["items"][i].caption for i, r in zip(good, rows)]
        assert all(hits) and np.mean(top1) >= 0.99, (kind, np.mean(hits), np.mean(top1))


def test_text_file_and_float16_output(export, tmp_path):
    texts = tmp_path / "lines.txt"
    texts.write_text("a red square\n\nthe second text\n" + "x" * 40000 + "\nlast line\n")
    summary = embed_corpus(CorpusOptions(export=export, input=str(texts), output=str(tmp_path / "out"), dtype="float16",
                                         progress=False))
    data = read_output(tmp_path / "out")
    assert summary["kinds"] == ["text"] and list(data["metadata"]["id"]) == ["1", "3", "5"]
    assert sorted(data["failures"]["id"]) == ["2", "4"]
    reasons = dict(zip(data["failures"]["id"], data["failures"]["reason"]))
    assert "empty text" in reasons["2"] and "over the limit of 32768 bytes" in reasons["4"]
    want = Embedder.load(export).encode(text=["a red square", "the second text", "last line"])
    assert data["text"].dtype == np.float16 and cosines(data["text"].astype(np.float32), want).min() >= 0.9999
    assert not (tmp_path / "out" / "img_emb").exists()


def test_composed_items_from_a_table(export, corpus, tmp_path):
    items = corpus["items"][:50]
    table = write_table(tmp_path / "t" / "items.jsonl", items)
    embed_corpus(CorpusOptions(export=export, input=str(table), output=str(tmp_path / "out"), kinds=["composed"],
                               progress=False))
    data = read_output(tmp_path / "out")
    good = [i for i, item in enumerate(items) if item.bad is None]
    want = Embedder.load(export).encode(images=[items[i].data for i in good], text=[items[i].caption for i in good])
    assert list(data["metadata"]["id"]) == [f"row-{items[i].key}" for i in good]
    assert cosines(data["composed"], want).min() >= 0.9999 and list(data["table"].columns) == ["id", "embedding"]


def test_wrong_input_is_refused_in_one_line_with_nothing_written(export, corpus, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    duplicated = tmp_path / "dup.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "a"], "text": ["x", "y", "z"]}), duplicated)
    no_id = tmp_path / "noid.csv"
    no_id.write_text("name,text\na,x\n")
    cases = [(str(duplicated), "1 ids occur more than once (e.g. 'a', 2 times)"),
             (str(no_id), "no id column 'id' (columns: name, text); name it with --id-column"),
             (str(tmp_path / "missing"), "not found")]
    for path, message in cases:
        with pytest.raises(BgevlError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
            embed_corpus(CorpusOptions(export=export, input=path, output=str(tmp_path / "out"), progress=False))
        assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_another_model_or_precision_in_an_existing_output_is_refused(export, outputs, tmp_path):
    """An export of another precision (its manifest, graphs linked) into the fp32 output: refused before the model
    loads, and the output is untouched."""
    other = tmp_path / "fp16"
    shutil.copytree(export, other, symlinks=True)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["precision"] = "fp16"
    (other / "manifest.json").write_text(json.dumps(manifest))
    out, _ = outputs["folder"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(BgevlError, match=r'precision: "fp32" there, "fp16" now.*not mixed'):
        embed_corpus(CorpusOptions(export=other, input=str(json.loads((out / "manifest.json").read_text())["input"]["path"]),
                                   output=str(out), partition_size=250, progress=False))
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def _command(export: Path, folder: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "bgevl.corpus.cli", "--export", str(export), "--input", str(folder), "--output",
            str(out), "--partition-size", "60", "--batch-size", "16", "--workers", "2", "--log-interval", "0"]


def test_sigkill_at_a_random_point_then_the_same_command_gives_every_id_exactly_once(export, corpus, outputs, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(_command(export, corpus["folder"], out), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    rng = random.Random(os.getpid())
    target = rng.randint(1, 6)  # killed after a random number of complete partitions (of 10), mid-partition
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            manifest = out / "manifest.json"
            if manifest.exists() and len(json.loads(manifest.read_text())["partitions"]) >= target:
                time.sleep(rng.uniform(0.0, 0.5))
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    killed = json.loads((out / "manifest.json").read_text())
    assert not killed["complete"] and 0 < len(killed["partitions"]) < 10
    result = subprocess.run(_command(export, corpus["folder"], out), env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["skipped"] == sum(p["items"] for p in killed["partitions"]) > 0
    data = read_output(out)
    ids, failed = list(data["metadata"]["id"]), list(data["failures"]["id"])
    assert len(ids) + len(failed) == N_ITEMS == len(set(ids) | set(failed))
    assert not list(out.rglob(".*partial"))
    clean = read_output(outputs["folder"][0])
    assert ids == list(clean["metadata"]["id"])  # the same rows in the same order as an uninterrupted run
    assert cosines(data["image"], clean["image"]).min() >= 0.99999


def test_sigterm_stops_cleanly_and_the_cli_refuses_bad_options(export, corpus, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(_command(export, corpus["folder"], out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out / "manifest.json").exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "run the same command to resume" in err
    assert not list(out.rglob(".*partial"))
    bad = subprocess.run([sys.executable, "-m", "bgevl.corpus.cli", "--export", str(export), "--input", str(corpus["folder"]),
                          "--output", str(tmp_path / "o2"), "--kinds", "image,video"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "video unknown" in bad.stderr
    assert not (tmp_path / "o2").exists()
    help_text = subprocess.run([sys.executable, "-m", "bgevl.corpus.cli", "--help"], env=env, capture_output=True, text=True).stdout
    for group in ("input and output", "embedding", "runtime (one machine)", "many machines", "--ray-address", "--instruction"):
        assert group in help_text


def test_ray_data_on_a_local_ray_instance_gives_the_local_vectors(export, corpus, tmp_path):
    """Ray Data with 2 actors (a local Ray instance, 2 CPUs) on WebDataset shards: the same files as the local
    engine, row for row (both run the same BatchEmbedder on the same export)."""
    ray = pytest.importorskip("ray", reason="Ray is the optional 'ray' extra")
    items = corpus["items"][:120]
    shards = write_shards(tmp_path / "shards", items, per_shard=64)[0].parent
    common = dict(export=export, input=str(shards), batch_size=16, progress=False)
    local = embed_corpus(CorpusOptions(output=str(tmp_path / "local"), **common))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = embed_corpus(CorpusOptions(output=str(tmp_path / "ray"), ray_address="local", ray_workers=2, **common))
    finally:
        ray.shutdown()
    assert remote["engine"] == "ray" and (remote["embedded"], remote["failed"]) == (local["embedded"], local["failed"]) == (117, 3)
    a, b = read_output(tmp_path / "local"), read_output(tmp_path / "ray")
    assert a["metadata"].equals(b["metadata"]) and a["failures"].equals(b["failures"])
    for kind in ("image", "text"):
        assert cosines(a[kind], b[kind]).min() >= 0.99999
