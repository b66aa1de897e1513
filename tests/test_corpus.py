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
from bgevl.core.errors import BgevlError
from bgevl.runtime import Embedder

N_ITEMS = 600  # test_three_thousand_images_as_shards (slow) runs 3000
BAD_EVERY = 40  # 15 bad images: corrupt, empty and bomb in turn
REPO = Path(__file__).resolve().parents[1]
KILLED_ITEMS = 240  # 10 partitions of 24 in the SIGKILL test


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
    texts.write_text("a red square\nthe second text\n\n" + "x" * 40000 + "\nlast line\n")
    summary = embed_corpus(CorpusOptions(export=export, input=str(texts), output=str(tmp_path / "out"), dtype="float16",
                                         partition_size=2, progress=False))
    data = read_output(tmp_path / "out")
    assert summary["kinds"] == ["text"] and list(data["metadata"]["id"]) == ["1", "2", "5"]
    # partition 1 (lines 3 and 4) has failures only: its failures are written, and no .npy
    assert sorted(data["failures"]["id"]) == ["3", "4"] and summary["partitions"] == 3
    assert sorted(p.name for p in (tmp_path / "out" / "text_emb").iterdir()) == ["text_emb_00000.npy", "text_emb_00002.npy"]
    reasons = dict(zip(data["failures"]["id"], data["failures"]["reason"]))
    assert "empty text" in reasons["3"] and "over the limit of 32768 bytes" in reasons["4"]
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
            str(out), "--partition-size", "24", "--batch-size", "8", "--workers", "2", "--log-interval", "0"]


def test_sigkill_at_a_random_point_then_the_same_command_gives_every_id_exactly_once(export, corpus, reference, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    folder = write_folder(tmp_path / "folder", corpus["items"][:KILLED_ITEMS])
    proc = subprocess.Popen(_command(export, folder, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    rng = random.Random(os.getpid())
    # killed as soon as a random number of partitions (of 10) is complete, so within the next one: at most 4
    # of 10, and no pause before the kill, so that the 6 or more left cannot all finish first on a fast machine
    target = rng.randint(1, 4)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            manifest = out / "manifest.json"
            try:
                if len(json.loads(manifest.read_text())["partitions"]) >= target:
                    break
            except (OSError, ValueError):  # not written yet
                pass
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    killed = json.loads((out / "manifest.json").read_text())
    assert not killed["complete"] and 0 < len(killed["partitions"]) < KILLED_ITEMS // 24
    result = subprocess.run(_command(export, folder, out), env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["skipped"] == sum(p["items"] for p in killed["partitions"]) > 0
    assert (summary["embedded"], summary["failed"], summary["partitions"]) == (KILLED_ITEMS - 6, 6, 10)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["partitions"][:len(killed["partitions"])] == killed["partitions"]
    data = read_output(out)
    ids, failed = list(data["metadata"]["id"]), list(data["failures"]["id"])
    assert len(ids) + len(failed) == KILLED_ITEMS == len(set(ids) | set(failed))
    assert sorted(index_of("folder", f) for f in failed) == [i for i in range(KILLED_ITEMS) if corpus["items"][i].bad]
    assert not list(out.rglob(".*partial"))
    order = [index_of("folder", i) for i in ids]
    assert order == sorted(order, key=lambda i: (i % 4, i))  # input order: d00/..., d01/..., each sorted
    assert cosines(data["image"], np.stack([reference["image"][i] for i in order])).min() >= 0.9999


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


@pytest.mark.slow  # 40 s: the tiny MLLM embeds slowly on 2 cores; the CLIP tests cover the pass-through of options
def test_mllm_role_and_instruction_pass_through(export_dir, corpus, tmp_path):
    """The MLLM's options reach the model: composed queries with an instruction, and candidates' texts, equal
    Embedder.encode with the same role and instruction (and differ from the defaults)."""
    mllm = export_dir("fp32", model="tiny-mllm")
    items = [item for item in corpus["items"][:8] if item.bad is None]
    table = write_table(tmp_path / "t" / "items.csv", items)
    instruction = "Retrieve the image that matches the caption."
    embed_corpus(CorpusOptions(export=mllm, input=str(table), output=str(tmp_path / "q"), kinds=["composed"],
                               role="query", instruction=instruction, progress=False))
    embed_corpus(CorpusOptions(export=mllm, input=str(table), output=str(tmp_path / "c"), kinds=["text"], progress=False))
    embedder = Embedder.load(mllm)
    images, texts = [item.data for item in items], [item.caption for item in items]
    queries = embedder.encode(images=images, text=texts, role="query", instruction=instruction)
    assert cosines(read_output(tmp_path / "q")["composed"], queries).min() >= 0.9999
    candidates = embedder.encode(text=texts, role="candidate")
    assert cosines(read_output(tmp_path / "c")["text"], candidates).min() >= 0.9999
    assert cosines(embedder.encode(text=texts, role="query", instruction=instruction), candidates).max() < 0.9999


def test_a_triton_server_as_the_engine_gives_the_local_vectors(export, corpus, outputs, tmp_path):
    """--triton: a bgevl-serve repository of the same export on a local Triton server (127.0.0.1); the bad images
    are failures found here, the rest are embedded there, equal to the local engine's rows."""
    pytest.importorskip("tritonclient.http", reason="needs the serving extra: pip install '.[serving]'")
    from bgevl.serving.repository import write_repository
    from bgevl.serving.server import TritonServer

    items = corpus["items"][:80]
    folder = write_folder(tmp_path / "folder", items)
    server = TritonServer(write_repository(export, tmp_path / "repo", sink=None), http_port=None, grpc_port=None,
                          metrics_port=None).start()
    try:
        summary = embed_corpus(CorpusOptions(export=export, input=str(folder), output=str(tmp_path / "triton"),
                                             triton=server.http_url, batch_size=32, progress=False))
    finally:
        server.stop()
    local = embed_corpus(CorpusOptions(export=export, input=str(folder), output=str(tmp_path / "local"), progress=False))
    assert summary["engine"] == "triton" and (summary["embedded"], summary["failed"]) == (local["embedded"], local["failed"]) == (78, 2)
    a, b = read_output(tmp_path / "local"), read_output(tmp_path / "triton")
    assert a["metadata"].equals(b["metadata"]) and list(a["failures"]["id"]) == list(b["failures"]["id"])
    for kind in ("image", "text"):
        assert cosines(a[kind], b[kind]).min() >= 0.9999


def test_fsspec_urls_in_and_out_and_a_second_run_keeps_everything(export, corpus, reference):
    """Input and output through fsspec (its in-memory filesystem standing for object storage); the same job again
    skips every partition and keeps their records and counts."""
    fsspec = pytest.importorskip("fsspec")
    import io

    fs = fsspec.filesystem("memory")
    items = corpus["items"][:20]
    for item in items:
        fs.pipe(f"/corpus-src/{item.key}.jpg", item.data)
        fs.pipe(f"/corpus-src/{item.key}.txt", item.caption.encode())
    try:
        options = dict(export=export, input="memory://corpus-src", output="memory://corpus-dst", partition_size=8,
                       progress=False)
        first = embed_corpus(CorpusOptions(**options))
        again = embed_corpus(CorpusOptions(**options))
        assert (first["embedded"], first["failed"], first["partitions"]) == (20, 0, 3)
        assert (again["embedded"], again["failed"], again["skipped"], again["embedded_now"]) == (20, 0, 20, 0)
        vectors = np.concatenate([np.load(io.BytesIO(fs.cat(f"/corpus-dst/img_emb/img_emb_0000{n}.npy"))) for n in range(3)])
        assert cosines(vectors, np.stack([reference["image"][i] for i in range(20)])).min() >= 0.9999
    finally:
        fs.rm("/corpus-src", recursive=True)
        if fs.exists("/corpus-dst"):
            fs.rm("/corpus-dst", recursive=True)


@pytest.mark.slow  # 3000 images: about 35 s on 2 cores (the default tests use 600)
def test_three_thousand_images_as_shards(export, tmp_path):
    items = make_items(3000, bad_every=BAD_EVERY)
    shards = write_shards(tmp_path / "shards", items, per_shard=1000)[0].parent
    summary = embed_corpus(CorpusOptions(export=export, input=str(shards), output=str(tmp_path / "out"), progress=False))
    data = read_output(tmp_path / "out")
    bad = sorted(i for i, item in enumerate(items) if item.bad)
    assert (summary["embedded"], summary["failed"]) == (3000 - len(bad), len(bad))
    assert sorted(int(f[:5]) * 1000 + int(f[5:]) for f in data["failures"]["id"]) == bad
    order = [int(i[:5]) * 1000 + int(i[5:]) for i in data["metadata"]["id"]]
    want = Embedder.load(export).encode(images=[items[i].data for i in order])
    assert cosines(data["image"], want).min() >= 0.9999


@pytest.mark.slow  # 15 s: a smoke test of the benchmark; the engines it runs are tested above
def test_bgevl_bench_corpus_measures_and_reports(export, tmp_path):
    """The corpus workload of bgevl-bench on a small corpus (no Ray): its report and figures are written."""
    from bgevl.benchmarks.cli import main

    assert main(["corpus", "--export", str(export), "--items", "40", "--image-size", "32", "--ray-workers", "0",
                 "--workdir", str(tmp_path / "work"), "--output", str(tmp_path / "res")]) == 0
    results = json.loads((tmp_path / "res" / "results.json").read_text())
    assert results["items"] == 40 and results["results"]["local"]["embedded"] == 40
    assert results["results"]["encode"]["items_per_s"] > 0 and results["results"]["local"]["peak_rss_mb"] > 50
    assert "local / encode" in (tmp_path / "res" / "report.md").read_text()


def test_shard_metadata_of_varying_keys_and_types_is_kept(export, corpus, tmp_path):
    import tarfile as tar_module

    shards = write_shards(tmp_path / "shards", corpus["items"][:6], per_shard=6)
    odd = tmp_path / "shards" / "00001.tar"  # a second shard whose samples' .json differ from img2dataset's
    with tar_module.open(odd, "w") as tar:
        for key, meta in (("000010000", {"width": "wide", "extra": {"a": 1}}), ("000010001", {"width": 3})):
            for ext, body in (("png", corpus["items"][0].data), ("txt", b"a caption"), ("json", json.dumps(meta).encode())):
                info = tar_module.TarInfo(f"{key}.{ext}")
                info.size = len(body)
                tar.addfile(info, __import__("io").BytesIO(body))
    summary = embed_corpus(CorpusOptions(export=export, input=str(shards[0].parent), output=str(tmp_path / "out"),
                                         partition_size=4, progress=False))
    assert (summary["embedded"], summary["failed"]) == (8, 0)
    meta = read_output(tmp_path / "out")["metadata"].set_index("id")
    assert meta.loc["000010000", "width"] == "wide" and meta.loc["000010001", "width"] == "3"
    assert json.loads(meta.loc["000010000", "extra"]) == {"a": 1} and meta.loc["000000000", "status"] == "success"


def test_a_file_name_that_is_not_utf8_is_embedded_and_recorded_escaped(export, tmp_path):
    """One such name crashed the whole job in the Parquet writer, and every rerun again."""
    import pyarrow.parquet as pq

    folder = tmp_path / "in"
    folder.mkdir()
    items = make_items(3)
    for i, item in enumerate(items):
        name = b"caf\xe9.jpg" if i == 0 else f"ok{i}.jpg".encode()
        with open(os.path.join(os.fsencode(folder), name), "wb") as fh:
            fh.write(item.data)
    summary = embed_corpus(CorpusOptions(export=export, input=str(folder), output=str(tmp_path / "out"), progress=False))
    assert summary["embedded"] == 3 and summary["failed"] == 0
    rows = [r for f in sorted((tmp_path / "out" / "metadata").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert sorted(r["id"] for r in rows) == ["caf\\xe9.jpg", "ok1.jpg", "ok2.jpg"]
    vectors = np.concatenate([np.load(f) for f in sorted((tmp_path / "out").rglob("img_emb_*.npy"))])
    direct = Embedder.load(export).encode(images=[items[0].data])
    assert float(vectors[[r["id"] for r in rows].index("caf\\xe9.jpg")] @ direct[0]) > 0.9999


def test_an_output_name_with_glob_characters_leaves_its_siblings_alone(export, tmp_path):
    """--output 'g[1]' read as a pattern deleted a killed run's temporary files of the sibling folder g1/."""
    sibling = tmp_path / "g1" / "metadata" / ".metadata_0000.parquet.partial"
    sibling.parent.mkdir(parents=True)
    sibling.write_bytes(b"someone else's")
    folder = write_folder(tmp_path / "in", make_items(2))
    out = tmp_path / "g[1]"
    embed_corpus(CorpusOptions(export=export, input=str(folder), output=str(out), progress=False))
    leftover = out / "metadata" / ".metadata_0001.parquet.partial"  # as a killed run of this output leaves it
    leftover.write_bytes(b"half written")
    embed_corpus(CorpusOptions(export=export, input=str(folder), output=str(out), progress=False))  # the rerun
    assert sibling.read_bytes() == b"someone else's"
    assert not leftover.exists()


def test_a_triton_model_that_goes_away_is_waited_for_and_never_recorded_as_failed_items(export, tmp_path):
    """bgevl-serve unloads a model (and its callers) while it reloads a dead one: the items of that moment are
    sent again once it is back, not recorded as failures; past the retry window the job ends (non-zero, its
    complete partitions kept), with no item failed for it."""
    pytest.importorskip("tritonclient.http", reason="needs the serving extra: pip install '.[serving]'")
    import threading
    import urllib.request

    from bgevl.core.manifest import read_manifest
    from bgevl.corpus.pipeline import BatchResult
    from bgevl.corpus.triton_engine import ServerUnavailable, TritonBatchEmbedder, TritonModel
    from bgevl.serving.repository import write_repository
    from bgevl.serving.server import ADMIN_HEADER, TritonServer

    server = TritonServer(write_repository(export, tmp_path / "repo", sink=None), http_port=None, grpc_port=None,
                          metrics_port=None).start()

    def control(action: str) -> None:
        request = urllib.request.Request(f"http://{server.http_url}/v2/repository/models/bgevl/{action}", data=b"{}",
                                         method="POST", headers={ADMIN_HEADER: server.admin_key})
        with urllib.request.urlopen(request, timeout=120) as answer:
            assert answer.status == 200

    feeds = {"TEXT": np.array([b"a red square", b"a blue circle"], dtype=object).reshape(-1, 1)}
    try:
        model = TritonModel(read_manifest(export), server.http_url, "bgevl", retry_window_s=60)
        before = model.run(feeds)
        control("unload")
        back = threading.Timer(1.5, control, ("load",))
        back.start()
        started = time.monotonic()
        after = model.run(feeds)  # waits for the model instead of failing the items
        back.join()
        assert time.monotonic() - started >= 1.0 and cosines(before, after).min() >= 0.99999
        control("unload")
        impatient = TritonModel.__new__(TritonModel)
        impatient.__dict__.update(model.__dict__, retry_window_s=1.0)
        embedder = TritonBatchEmbedder(impatient, ["text"])
        result = BatchResult()
        result.parts.append(([object(), object()], ["a red square", "a blue circle"], {"text": feeds}))
        with pytest.raises(ServerUnavailable, match=r"has not answered for 1 s .*run the same command to resume"):
            embedder.run(result)
        assert result.failed == []
    finally:
        server.stop()


def _failures(out: Path) -> dict[str, str]:
    import pyarrow.parquet as pq

    rows = [r for f in sorted((out / "failures").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    return {r["id"]: r["reason"] for r in rows}


def test_devices_fifos_and_urls_in_a_table_are_failures_of_their_own(export, tmp_path):
    """/dev/zero read until a MemoryError and a FIFO hung the job; a table's http(s) URLs were fetched with no
    policy (internal addresses included). Now each is its item's failure, and URLs follow the API's policy."""
    import csv

    from test_api import image_host

    items = make_items(2)
    (tmp_path / "good.jpg").write_bytes(items[0].data)
    os.mkfifo(tmp_path / "pipe.jpg")
    with image_host({"/a.jpg": (200, {"Content-Type": "image/jpeg"}, items[1].data)}) as host:
        port = host.rsplit(":", 1)[1]
        table = tmp_path / "items.csv"
        with table.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "image"])
            writer.writerows([["good", str(tmp_path / "good.jpg")], ["zero", "/dev/zero"], ["fifo", str(tmp_path / "pipe.jpg")],
                              ["by-address", f"http://{host}/a.jpg"], ["by-name", f"http://localhost:{port}/a.jpg"],
                              ["metadata", "http://169.254.169.254/latest/meta-data"]])
        closed = embed_corpus(CorpusOptions(export=export, input=str(table), output=str(tmp_path / "closed"),
                                            progress=False))
        allowed = embed_corpus(CorpusOptions(export=export, input=str(table), output=str(tmp_path / "allowed"),
                                             progress=False, allow_image_hosts=(host, f"localhost:{port}", "*")))
    assert (closed["embedded"], closed["failed"]) == (1, 5) and (allowed["embedded"], allowed["failed"]) == (2, 4)
    reasons = _failures(tmp_path / "allowed")
    assert "is not a regular file" in reasons["zero"] and "is not a regular file" in reasons["fifo"]
    assert "resolves to 127.0.0.1" in reasons["by-name"] and "169.254.169.254" in reasons["metadata"]
    assert "fetches them only from the hosts given with --allow-image-host" in _failures(tmp_path / "closed")["by-address"]


def test_a_shard_member_declaring_a_huge_size_is_not_read_into_memory(export, tmp_path):
    """A 20 KB sparse shard declaring a 16 GiB member took memory until a MemoryError, and every later shard was
    lost; now its sample (or the rest of the shard) is a failure and the next shard is read."""
    import tarfile

    shards = write_shards(tmp_path / "shards", make_items(4), per_shard=2)
    member = tarfile.TarInfo("00009/00090009.jpg")
    member.size = 16 * 2 ** 30
    bad = tmp_path / "shards" / "00000.tar"
    bad.write_bytes(member.tobuf() + b"\0" * 20000)  # the header's claim, without the data
    summary = embed_corpus(CorpusOptions(export=export, input=str(tmp_path / "shards"), output=str(tmp_path / "out"),
                                         kinds=["image"], progress=False))
    assert summary["embedded"] == 2 and summary["failed"] >= 1  # the second shard's two samples
    assert any("over the" in r and "limit of one item" in r or "shard unreadable" in r
               for r in _failures(tmp_path / "out").values())
    assert len(shards) == 2


def test_a_full_output_is_one_line_and_the_complete_partitions_are_kept(export, tmp_path, monkeypatch, capsys):
    """A full or read-only output was a traceback; now one line saying what is kept and how to resume."""
    import errno

    from bgevl.corpus.cli import main
    from bgevl.corpus.output import CorpusOutput

    folder = write_folder(tmp_path / "in", make_items(30))
    write = CorpusOutput.write
    calls = []

    def full_after_one(self, part, items):
        calls.append(part.number)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "img_emb"))
        return write(self, part, items)

    monkeypatch.setattr(CorpusOutput, "write", full_after_one)
    code = main(["--export", str(export), "--input", str(folder), "--output", str(tmp_path / "out"),
                 "--partition-size", "10", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("bgevl-embed: error: No space left on device: ") and "complete partitions are kept" in err
    monkeypatch.setattr(CorpusOutput, "write", write)
    summary = embed_corpus(CorpusOptions(export=export, input=str(folder), output=str(tmp_path / "out"),
                                         partition_size=10, progress=False))
    assert summary["skipped"] == 10 and summary["embedded"] == 30  # the first partition kept, the rest resumed
