"""The benchmark suite runs on the tiny models and writes well-formed reports. No speed is asserted."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from bgevl.benchmarks.cli import main

pytest.importorskip("matplotlib", reason="needs the bench extra: pip install '.[bench]'")


def test_bench_runs_every_backend_and_writes_json_markdown_and_plots(tmp_path, capsys):
    out = tmp_path / "bench"
    backends = {"pytorch", "onnxruntime-fp32", "onnxruntime-fp16", "onnxruntime-int8", "onnxruntime-int8-dynamic",
                "runtime", "triton", "api", "api-triton"}
    rc = main(["--models", "tiny", "--backends", ",".join(sorted(backends)), "--batch-sizes", "1,2", "--concurrency", "1,2",
               "--warmup", "1", "--min-repeats", "2", "--min-seconds", "0", "--sweep-seconds", "0.5", "--peak-sizes", "256,512", "--output", str(out)])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert data["command"].startswith("bgevl-bench --models tiny") and data["hardware"]["matmul_peaks"]["fp32"] > 0
    assert {"torch", "onnxruntime", "transformers"} <= set(data["software"])
    rows = data["results"]
    assert len(rows) == 3 * 2 * len(backends)  # workloads x batch sizes x backends
    for row in rows:
        assert row["backend"] in backends and row["repetitions"] >= 2
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"] and row["items_per_s"] > 0
        assert row["min_cosine_vs_pytorch"] > 0.99 and row["peak_rss_mb"] > 0
        if row["level"] == "model":
            assert row["gflop_per_call"] > 0 and row["gflops"] > 0 and "speedup_vs_pytorch" in row
    _check_flops_of_a_padded_batch(out, rows)
    assert {(s["workload"], s["concurrency"]) for s in data["triton_sweep"]} == {
        (w, c) for w in ("image", "text", "composed") for c in (1, 2)}
    # Triton's own load generator measures the sweep where it runs; otherwise the report says why not
    from bgevl.serving import perf_analyzer

    binary, why = perf_analyzer.find()
    clients = {s["client"] for s in data["triton_sweep"]}
    if binary is not None:
        assert clients == {"perf_analyzer 2.51.0 (gRPC)"}
        assert all(s["items_per_s"] > 0 and 0 < s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"] for s in data["triton_sweep"])
    else:
        assert clients == {"bgevl-bench threads (HTTP)"} and any(why in n for n in data["notes"])
    cases = [(w, b) for w in ("image", "text", "composed") for b in (1, 2)]
    _check_api_rows(rows, "api", "runtime", cases)
    _check_api_rows(rows, "api-triton", "triton", cases)
    report = (out / "report.md").read_text()
    assert "the embeddings API (api) " in report and "over runtime at p50" in report and "over triton at p50" in report
    assert "## Findings" in report and "x PyTorch eager" in report and "Triton p50" in report
    for backend in backends:
        # one row in the main table (the paired-ratio and Pareto tables list model-level backends again)
        assert sum(report.count(f"| image | 2 | {backend} | {level} |") for level in ("model", "end-to-end")) == 1
    for plot in ("latency_tiny.png", "triton_tiny.png"):
        assert plot in data["plots"] and f"]({plot})" in report
        with Image.open(out / plot) as image:
            assert image.format == "PNG" and image.width > 300
    assert capsys.readouterr().out.strip().endswith("report.md")


def test_bench_rejects_unknown_backends(tmp_path, capsys):
    assert main(["--models", "tiny", "--backends", "pytorch,onnxruntime-fp64", "--output", str(tmp_path)]) == 2
    assert "unknown ['onnxruntime-fp64']" in capsys.readouterr().err


def test_an_interrupted_bench_leaves_nothing_half_written_and_prints_one_line(tmp_path, signum="SIGTERM"):
    """SIGTERM (docker stop, a CI cancel) or Ctrl-C while an export is under way: the staging directory and
    the exporter's temporary folder go, and the tool says so in one line (exit 130), with no traceback.
    (SIGINT goes through the same handler: ``bgevl.core.interrupts``.)"""
    import os
    import signal
    import subprocess
    import sys
    import time

    tmp, out = tmp_path / "tmp", tmp_path / "bench"
    tmp.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "bgevl.benchmarks.cli", "--models", "tiny", "--backends",
                             "pytorch,onnxruntime-fp32", "--peak-sizes", "256", "--output", str(out)], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(tmp)})
    log = []
    for line in proc.stderr:
        log.append(line)
        if "exporting tiny fp32" in line:
            break
    deadline = time.monotonic() + 120
    while not list((out / "exports").glob(".*.partial-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list((out / "exports").glob(".*.partial-*")) and list(tmp.iterdir()), "".join(log)
    proc.send_signal(getattr(signal, signum))
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, rest
    assert "Traceback" not in rest and "KeyboardInterrupt" not in rest and "BrokenPipe" not in rest, rest
    assert rest.strip().splitlines()[-1].startswith("bgevl-bench: interrupted; nothing half-written was left")
    assert not list((out / "exports").glob(".*"))
    assert not [p.name for p in tmp.iterdir() if p.name.startswith(("bgevl", "tmp"))]  # OpenVINO's .ses may stay


def _bench_api(tmp_path, backends: str, workloads: str = "image,text", batches: str = "1,8") -> list[dict]:
    out = tmp_path / "bench"
    assert main(["--models", "tiny", "--backends", backends, "--batch-sizes", batches, "--workloads", workloads,
                 "--warmup", "1", "--min-repeats", "3", "--min-seconds", "0", "--peak-sizes", "256,512", "--output", str(out)]) == 0
    return json.loads((out / "results.json").read_text())["results"]


def _check_api_rows(rows: list[dict], api: str, reference: str, cases) -> None:
    mine = [r for r in rows if r["backend"] == api]
    assert {(r["workload"], r["batch"]) for r in mine} == set(cases)
    for row in mine:
        ref = next(r for r in rows if r["backend"] == reference and (r["workload"], r["batch"]) == (row["workload"], row["batch"]))
        paired = row["paired"][reference]
        assert paired["rounds"] == row["repetitions"] and 0 < paired["p10"] <= paired["median"] <= paired["p90"]
        assert row[f"overhead_vs_{reference}_ms"] == pytest.approx(row["p50_ms"] - ref["p50_ms"])
        assert row["level"] == "end-to-end"
        if "min_cosine_vs_pytorch" in row:
            assert row["min_cosine_vs_pytorch"] > 0.99


@pytest.mark.slow
def test_bench_measures_the_api_in_front_of_triton_against_triton_direct(tmp_path):
    rows = _bench_api(tmp_path, "pytorch,runtime,triton,api,api-triton")
    cases = [(w, b) for w in ("image", "text") for b in (1, 8)]
    _check_api_rows(rows, "api", "runtime", cases)
    _check_api_rows(rows, "api-triton", "triton", cases)


def _check_flops_of_a_padded_batch(out, rows):
    """Two texts of different lengths run padded to the longer one: the call's FLOPs are twice those of the
    longer text alone (counted here on the fp32 text graph, independently of the suite's slicing)."""
    import numpy as np

    from bgevl.benchmarks.flops import graph_cost
    from bgevl.core.manifest import read_manifest
    from bgevl.core.probes import PROBE_TEXTS
    from bgevl.runtime.embedder import Embedder

    manifest = read_manifest(out / "exports" / "tiny-fp32")
    with Embedder.load(manifest.directory, backend="onnxruntime") as embedder:
        tokenizer = embedder.preprocessor.tokenizer
    lengths = [len(tokenizer(t)["input_ids"]) for t in PROBE_TEXTS[:2]]
    assert lengths[0] < lengths[1]
    ids = np.asarray([tokenizer(PROBE_TEXTS[1])["input_ids"]], np.int64)
    flops, _ = graph_cost(manifest.graph_path("text"), {"input_ids": ids, "attention_mask": np.ones_like(ids)}, [])
    (row,) = [r for r in rows if (r["workload"], r["batch"], r["backend"]) == ("text", 2, "onnxruntime-fp32")]
    assert row["gflop_per_call"] == pytest.approx(2 * flops / 1e9, rel=1e-9)
