"""bgevl-eval and the export's quality gate on a generated set the random-weight tiny models retrieve above chance:
fp32 against itself gives zero delta, the report's figures equal an independent recomputation from
``Embedder.encode``, an export damaged on purpose shows a drop and is refused, malformed data is refused in one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bgevl.core.errors import BgevlError
from bgevl.export import ExportOptions, run_export
from bgevl.quality import EvalOptions, RunSpec, evaluate, load_data
from bgevl.quality.cli import main as eval_main
from bgevl.quality.synthetic import write_quality_data
from bgevl.runtime import Embedder

REPO = Path(__file__).resolve().parents[1]
BASES, VARIANTS, PAIRS = 30, 3, 24


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_quality_data(tmp_path_factory.mktemp("quality") / "data", bases=BASES, variants=VARIANTS, pairs=PAIRS)


@pytest.fixture(scope="module")
def fp32(export_dir) -> Path:
    return export_dir("fp32")


def badly_quantized_projection(path: Path, scale: float) -> None:
    """Put a QuantizeLinear/DequantizeLinear pair with a far too coarse ``scale`` on the activations entering the
    graph's output projection (the last Gemm/MatMul with a weight before the first output): an int8 graph whose
    output projection is quantized badly."""
    model = onnx.load(str(path))
    graph = model.graph
    weights = {init.name for init in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    node = producer[graph.output[0].name]
    while not (node.op_type in ("Gemm", "MatMul") and node.input[1] in weights):
        node = producer[node.input[0]]
    x = node.input[0]
    weight = next(init for init in graph.initializer if init.name == node.input[1])
    fp16 = numpy_helper.to_array(weight).dtype == np.float16  # an fp16 graph: opset 18 quantizes float32 only
    graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), "bad_scale"),
                              numpy_helper.from_array(np.array(0, np.int8), "bad_zero_point")])
    nodes = [helper.make_node("Cast", [x], [x + "_f32"], to=onnx.TensorProto.FLOAT)] if fp16 else []
    nodes += [helper.make_node("QuantizeLinear", [x + "_f32" if fp16 else x, "bad_scale", "bad_zero_point"], [x + "_q"]),
              helper.make_node("DequantizeLinear", [x + "_q", "bad_scale", "bad_zero_point"], [x + "_dq"])]
    if fp16:
        nodes.append(helper.make_node("Cast", [x + "_dq"], [x + "_dq16"], to=onnx.TensorProto.FLOAT16))
    at = list(graph.node).index(node)
    for new in reversed(nodes):
        graph.node.insert(at, new)
    node.input[0] = nodes[-1].output[0]
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


#: the tiny CLIP's image graph, projection input quantized with a step of 10 (its activations are about +-3): the
#: image embeddings of different scenes collapse together. (Damaging the text graph instead would *raise* composed
#: recall here: on random weights the modification text's embedding is what scatters the composed queries.)
DAMAGED_GRAPH, DAMAGE_SCALE = "vision.onnx", 10.0


@pytest.fixture(scope="module")
def damaged(fp32, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("damaged") / "tiny-damaged"
    shutil.copytree(fp32, out)
    badly_quantized_projection(out / DAMAGED_GRAPH, DAMAGE_SCALE)
    return out


def run_eval(*args: str) -> tuple[int, str, str]:
    """bgevl-eval in this process (its exit status, stdout, stderr)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = eval_main([*args, "--quiet"])
    return rc, out.getvalue(), err.getvalue()


def figures(report: dict, run: int, task: str) -> dict[str, dict]:
    body = report["runs"][run]["tasks"][task]
    return {f["metric"]: f for f in body["figures"] + [body["overlap"]]}


# --- an independent recomputation: Embedder.encode, numpy argsort, Python sets --------------------------------
def independent_recall(queries: np.ndarray, gallery: np.ndarray, relevant: list[set[int]], k: int,
                       exclude: list[int] | None = None) -> float:
    hits = []
    for i, q in enumerate(queries):
        scores = gallery @ q
        order = [j for j in np.argsort(-scores, kind="stable") if exclude is None or j != exclude[i]]
        if relevant[i]:
            hits.append(bool(set(order[:k]) & relevant[i]))
    return 100 * sum(hits) / len(hits)


def test_fp32_against_itself_zero_delta_and_figures_match_an_independent_recomputation(fp32, data_dir, tmp_path):
    copy = tmp_path / "tiny-fp32-copy"
    shutil.copytree(fp32, copy)
    rc, markdown, err = run_eval("--reference", str(fp32), "--export", str(copy), "--data", str(data_dir),
                                 "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md"))
    assert rc == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert (tmp_path / "r.md").read_text() == markdown and "| R@10 |" in markdown
    assert [r["label"] for r in report["runs"]] == ["tiny-fp32", "tiny-fp32-copy"]
    for task in ("t2i", "i2t", "composed"):
        for fig in figures(report, 1, task).values():
            if "delta" in fig:
                assert fig["delta"] == 0.0 and fig["delta_ci95"] == [0.0, 0.0], (task, fig)
            else:
                assert fig["value"] == 100.0  # top-10 overlap with the reference's own rankings
    # the same figures from Embedder.encode and a plain loop (different batching, no shared code)
    data = load_data(data_dir)
    embedder = Embedder.load(fp32)
    triplets = data.triplets
    gallery = embedder.encode(images=[Path(item.image_uri) for item in triplets.gallery])
    queries = embedder.encode(images=[Path(q.image_uri) for q in triplets.queries], text=[q.text for q in triplets.queries])
    composed = figures(report, 0, "composed")
    assert composed["R@1"]["queries"] == BASES and triplets.describe()["targets_per_query"] == VARIANTS - 1
    for k in (1, 5, 10):
        first_target = [{t[0]} for t in triplets.targets]
        want = independent_recall(queries, gallery, first_target, k, triplets.reference)
        assert composed[f"R@{k}"]["value"] == pytest.approx(want, abs=1e-3)
    # well above chance: a random ranking of 89 images (the reference left out) has the first target in its top 10
    # for 10/89 = 11 % of the queries
    assert composed["R@10"]["chance"] == pytest.approx(100 * 10 / (BASES * VARIANTS - 1), abs=1e-3)
    assert composed["R@10"]["value"] >= 2.5 * composed["R@10"]["chance"]
    pairs = data.pairs
    images = embedder.encode(images=[Path(item.image_uri) for item in pairs.images])
    texts = embedder.encode(text=[c.text for c in pairs.captions])
    t2i, i2t = figures(report, 0, "t2i"), figures(report, 0, "i2t")
    assert t2i["R@1"]["queries"] == len(pairs.captions) > PAIRS  # every fifth image has a second caption
    for k in (1, 5, 10):
        assert t2i[f"R@{k}"]["value"] == pytest.approx(
            independent_recall(texts, images, [{i} for i in pairs.caption_image], k), abs=1e-3)
        owned = [{j for j, i in enumerate(pairs.caption_image) if i == n} for n in range(len(pairs.images))]
        assert i2t[f"R@{k}"]["value"] == pytest.approx(independent_recall(images, texts, owned, k), abs=1e-3)


def test_a_damaged_export_shows_a_drop_and_the_gate_of_bgevl_eval_refuses(fp32, damaged, data_dir, tmp_path):
    rc, _, err = run_eval("--export", str(fp32), "--export", str(damaged), "--data", str(data_dir),
                          "--json", str(tmp_path / "r.json"), "--max-recall-drop", "5")
    report = json.loads((tmp_path / "r.json").read_text())
    composed = figures(report, 1, "composed")
    assert composed["R@10"]["delta"] <= -15 and composed["R@10"]["delta_ci95"][1] < 0, composed["R@10"]
    assert composed["mAP@10"]["delta"] <= -10 and composed["mAP@10"]["delta_ci95"][1] < 0
    assert composed["top-10 overlap"]["value"] < 40
    assert rc == 1 and len(err.strip().splitlines()) == 1
    assert "bgevl-eval: quality gate: tiny-damaged: composed " in err and "points against tiny-fp32" in err


def test_the_export_gate_refuses_a_damaged_export_and_writes_nothing(data_dir, tmp_path, monkeypatch):
    import bgevl.export.driver as driver

    convert = driver.convert_graph

    def damaging(graph, src, dst, *args, **kw):
        details = convert(graph, src, dst, *args, **kw)
        if dst.name == DAMAGED_GRAPH:
            badly_quantized_projection(dst, DAMAGE_SCALE)
        return details

    monkeypatch.setattr(driver, "convert_graph", damaging)
    out = tmp_path / "refused"
    with pytest.raises(BgevlError) as refused:
        run_export(ExportOptions(output=out, precision="fp16", quality_data=data_dir, max_recall_drop=5,
                                 min_cosine=0.0), sink=lambda msg: None)
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and message.startswith(f"quality gate (--quality-data {data_dir}): fp16: composed ")
    assert "points against fp32 graphs of the same checkpoint" in message and "over the limit of 5" in message
    assert not out.exists() and not list(tmp_path.glob(".refused*"))


def test_the_export_gate_records_the_figures_bgevl_eval_measures(export_dir, fp32, data_dir, tmp_path):
    """fp16 passes; the manifest's figures are those of bgevl-eval against the fp32 export. (The limit is wide:
    on 30 random-weight composed queries one query moves a recall by 3.3 points, and fp16 may move one.)"""
    out = run_export(ExportOptions(output=tmp_path / "fp16", precision="fp16", quality_data=data_dir,
                                   max_recall_drop=10), sink=lambda msg: None)
    quality = json.loads((out / "manifest.json").read_text())["quality"]
    assert quality["passed"] and quality["max_recall_drop"] == 10
    assert quality["reference"] == "fp32 graphs of the same checkpoint"
    report = evaluate(load_data(data_dir), [RunSpec(fp32, provider="cpu"), RunSpec(out, provider="cpu")],
                      EvalOptions(progress=False), say=lambda msg: None)
    for task in ("t2i", "i2t", "composed"):
        body = report["runs"][1]["tasks"][task]
        assert quality["figures"][task] == body["figures"] + [body["overlap"]]
        assert all(f["delta"] >= -10.0 for f in body["figures"])


def test_mllm_queries_take_the_runtime_instructions(export_dir, tmp_path):
    """The MLLM embeds queries with role=query and an instruction, candidates with role=candidate: the report's
    composed recall equals the one from Embedder.encode with the export's default instruction."""
    root = write_quality_data(tmp_path / "data", bases=10, variants=2, pairs=4)
    export = export_dir("fp32", model="tiny-mllm")
    rc, markdown, err = run_eval("--export", str(export), "--data", str(root), "--json", str(tmp_path / "r.json"))
    assert rc == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    embedder = Embedder.load(export)
    run = report["runs"][0]
    assert run["instructions"]["composed"] == embedder.default_instruction is not None
    assert run["instructions"]["t2i"].startswith("Find me an everyday image")
    data = load_data(root)
    t = data.triplets
    gallery = embedder.encode(images=[Path(i.image_uri) for i in t.gallery], role="candidate")
    queries = embedder.encode(images=[Path(q.image_uri) for q in t.queries], text=[q.text for q in t.queries],
                              role="query", instruction=embedder.default_instruction)
    for k in (1, 5):
        want = independent_recall(queries, gallery, [{x[0]} for x in t.targets], k, t.reference)
        assert figures(report, 0, "composed")[f"R@{k}"]["value"] == pytest.approx(want, abs=1e-3)
    rc, _, err = run_eval("--export", str(export_dir("fp32")), "--data", str(root), "--instruction", "find it")
    assert rc == 2 and "--instruction: tiny takes no task instruction" in err


def test_an_item_that_cannot_be_read_is_left_out_of_every_run(fp32, tmp_path):
    root = write_quality_data(tmp_path / "data", bases=6, variants=2, pairs=5)
    (root / "gallery" / "scene0002_v1.png").write_bytes(b"not an image")  # query q0002's only target
    (root / "pairs" / "pair0001.txt").write_bytes(b"\xff\xfe not UTF-8")  # 6 captions (pair0004 has two) -> 5
    copy = tmp_path / "copy"
    shutil.copytree(fp32, copy)
    rc, markdown, err = run_eval("--export", str(fp32), "--export", str(copy), "--data", str(root),
                                 "--json", str(tmp_path / "r.json"))
    assert rc == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    excluded = {item["id"]: item["reason"] for item in report["excluded"]["items"]}
    assert report["excluded"]["count"] == 2 and set(excluded) == {"scene0002_v1.png", "pair0001.png"}
    assert "is not UTF-8" in excluded["pair0001.png"] and "tiny-fp32, gallery" in excluded["scene0002_v1.png"]
    composed = report["runs"][1]["tasks"]["composed"]
    assert (composed["queries"], composed["gallery"]) == (6, 11)
    assert composed["figures"][0]["queries"] == 5  # q0002 has no target left: no value, left out of the mean
    assert report["runs"][1]["tasks"]["t2i"]["queries"] == 5 and "2 items could not be evaluated" in markdown


def test_bgevl_bench_evaluates_the_exports_of_the_backends_it_ran(export_dir, data_dir, tmp_path):
    import argparse

    from bgevl.benchmarks.cli import bench_quality

    exports = tmp_path / "exports"  # bgevl-bench's export cache, filled from the fixtures
    shutil.copytree(export_dir("fp32"), exports / "tiny-fp32")
    shutil.copytree(export_dir("int8"), exports / "tiny-int8-qdq")
    args = argparse.Namespace(exports=exports, output=tmp_path, threads=1, random_weights=False)
    ran = [{"model": "tiny", "backend": b} for b in ("pytorch", "onnxruntime-fp32", "onnxruntime-int8", "runtime")]
    report = bench_quality("tiny", load_data(data_dir), ran, args, log=lambda msg: None)
    assert [(r["label"], r["precision"], r["int8_mode"]) for r in report["runs"]] == [
        ("onnxruntime-fp32", "fp32", None), ("onnxruntime-int8", "int8", "qdq")]
    again = evaluate(load_data(data_dir), [RunSpec(exports / "tiny-fp32", provider="cpu"),
                                           RunSpec(exports / "tiny-int8-qdq", provider="cpu")],
                     EvalOptions(progress=False), say=lambda msg: None)
    assert report["runs"][1]["tasks"] == again["runs"][1]["tasks"]


def test_pairs_from_a_table_and_from_shards_with_several_captions_per_image(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bgevl.corpus.synthetic import make_items, write_shards
    from bgevl.quality import read_pairs

    items = make_items(5)
    (tmp_path / "img").mkdir()
    for item in items:
        (tmp_path / "img" / f"{item.key}.jpg").write_bytes(item.data)
    # COCO's layout as a table: one row per caption, rows of one image share its path; a row without text is a
    # distractor image
    rows = [(f"r{n}", f"img/{items[i].key}.jpg", text) for n, (i, text) in enumerate(
        [(0, "a"), (0, "b"), (1, "c"), (2, "d"), (2, "e"), (2, "f"), (3, None)])]
    pq.write_table(pa.table({"id": [r[0] for r in rows], "image": [r[1] for r in rows], "caption": [r[2] for r in rows]}),
                   tmp_path / "coco.parquet")
    pairs = read_pairs(str(tmp_path / "coco.parquet"), text_column="caption")
    assert [i.id for i in pairs.images] == ["r0", "r2", "r3", "r6"]
    assert [(c.id, c.text) for c in pairs.captions] == [("r0", "a"), ("r1", "b"), ("r2", "c"), ("r3", "d"), ("r4", "e"),
                                                        ("r5", "f")]
    assert pairs.caption_image == [0, 0, 1, 2, 2, 2] and pairs.describe()["images_without_caption"] == 1
    items[1].caption = "first line\nsecond line"
    write_shards(tmp_path / "shards", items, per_shard=3)
    pairs = read_pairs(str(tmp_path / "shards"))
    assert len(pairs.images) == 5 and [c.text for c in pairs.captions][1:3] == ["first line", "second line"]
    assert [c.id for c in pairs.captions][1:3] == ["000000001#0", "000000001#1"] and pairs.caption_image[:4] == [0, 1, 1, 2]


# --- refusals: one line, nothing written ---------------------------------------------------------------------
def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def small_gallery(tmp_path_factory) -> Path:
    root = write_quality_data(tmp_path_factory.mktemp("small"), bases=3, variants=2, pairs=2)
    return root / "gallery"


TRIPLET_CASES = {
    "not json": ("[{", "not valid JSON (Expecting property name enclosed in double quotes at line 1 column 3)"),
    "not a list": ('"x"', "a JSON array of queries expected, found str"),
    "empty": ("[]", "no queries in it"),
    "no reference": ('[{"caption": "x", "target_hard": "scene0000_v1"}]', "query 1 (id '1') has no reference image"),
    "no text": ('[{"reference": "scene0000_v0", "target_hard": "scene0000_v1"}]', "has no modification text"),
    "no target": ('[{"reference": "scene0000_v0", "caption": "x"}]', "has no target image"),
    "targets not a list": ('[{"reference": "scene0000_v0", "caption": "x", "gt_img_ids": "scene0000_v1"}]',
                           "gt_img_ids must be a list of image ids"),
    "unknown image": ('[{"reference": "scene0000_v0", "caption": "x", "target_hard": "nowhere"}]',
                      "1 image ids are not in gallery"),
    "duplicate id": ('[{"id": 1, "reference": "scene0000_v0", "caption": "x", "target_hard": "scene0000_v1"},'
                     ' {"id": 1, "reference": "scene0001_v0", "caption": "y", "target_hard": "scene0001_v1"}]',
                     "id '1' occurs twice"),
}


@pytest.mark.parametrize("case", sorted(TRIPLET_CASES))
def test_malformed_triplets_are_refused_in_one_line(case, fp32, small_gallery, tmp_path):
    text, expected = TRIPLET_CASES[case]
    path = write(tmp_path / "triplets.json", text)
    rc, out, err = run_eval("--export", str(fp32), "--triplets", str(path), "--gallery", str(small_gallery),
                            "--json", str(tmp_path / "r.json"))
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"bgevl-eval: error: triplets {path}") and expected in err, err
    assert not (tmp_path / "r.json").exists()


def test_malformed_pairs_and_data_directories_are_refused_in_one_line(fp32, small_gallery, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = write(tmp_path / "lines.txt", "a cat\na dog\n")
    pq.write_table(pa.table({"id": ["a"], "caption": ["x"]}), tmp_path / "noimage.parquet")
    pq.write_table(pa.table({"id": ["a", "b"], "image": ["gallery/x.png", None], "text": ["x", "y"]}),
                   tmp_path / "hole.parquet")
    captionless = tmp_path / "captionless"
    shutil.copytree(small_gallery, captionless)
    (tmp_path / "empty").mkdir()
    cases = [
        (["--pairs", str(lines)], f"pairs {lines}: holds no images (text)"),
        (["--pairs", str(tmp_path / "noimage.parquet")], "neither an image column 'image' nor a text column 'text'"),
        (["--pairs", str(tmp_path / "hole.parquet")], "item 2 (id 'b') has no image; every pair needs one"),
        (["--pairs", str(captionless)], "none of its 6 images has a caption"),
        (["--data", str(tmp_path / "empty")], "holds neither pairs/ (or pairs.csv|jsonl|parquet) nor triplets.json"),
        (["--data", str(tmp_path / "missing")], "no such directory"),
        (["--triplets", str(tmp_path / "t.json")], "--triplets and --gallery go together"),
        ([], "no data: give --data DIR"),
    ]
    for args, expected in cases:
        rc, out, err = run_eval("--export", str(fp32), *args, "--json", str(tmp_path / "r.json"))
        assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1 and expected in err, (args, err)
    assert not (tmp_path / "r.json").exists()
    rc, _, err = run_eval("--export", str(tmp_path / "empty"), "--data", str(small_gallery.parent))
    assert rc == 2 and "no manifest.json in" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(BgevlError, match=r"^--quality-data .*/missing: no such directory"):
        run_export(ExportOptions(output=tmp_path / "x", quality_data=tmp_path / "missing"), sink=lambda m: None)
    with pytest.raises(BgevlError, match=r"^--max-recall-drop 2: give it with --quality-data DIR"):
        run_export(ExportOptions(output=tmp_path / "x", max_recall_drop=2), sink=lambda m: None)
    assert not (tmp_path / "x").exists()


def test_bgevl_eval_help_shows_the_whole_tool():
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    text = subprocess.run([sys.executable, "-m", "bgevl.quality.cli", "--help"], env=env, capture_output=True,
                          text=True, check=True).stdout
    for option in ("--export", "--reference", "--backend", "--data", "--pairs", "--triplets", "--gallery",
                   "--instruction", "--recall-k", "--map-k", "--bootstrap", "--json", "--markdown", "--max-recall-drop"):
        assert option in text


def test_the_export_gate_refuses_data_of_which_nothing_can_be_measured(tmp_path):
    """Every evaluation image corrupt: no query is left, and the gate refuses instead of passing on nothing."""
    data = write_quality_data(tmp_path / "data", bases=4, variants=2, pairs=6)
    for image in [p for p in data.rglob("*") if p.suffix.lower() in (".png", ".jpg")]:
        image.write_bytes(b"not an image")
    out = tmp_path / "refused"
    with pytest.raises(BgevlError) as refused:
        run_export(ExportOptions(output=out, precision="fp16", quality_data=data), sink=lambda msg: None)
    message = str(refused.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"quality gate (--quality-data {data}): nothing to measure for t2i, i2t, composed: ")
    assert "18 items excluded" in message and not out.exists()
