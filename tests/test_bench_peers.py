"""bgevl-bench against the PyTorch a user would pick: the CPU's ISA from /proc/cpuinfo text, each precision's
own peak and a row's share of it, the best PyTorch variant per accuracy class, and the bench leaving bf16
peers out (in one line) where the CPU has no bf16. No speed is asserted: the figures are injected."""

from __future__ import annotations

import json

import pytest

from bgevl.benchmarks import hardware
from bgevl.benchmarks.hardware import bf16_absent, cpu_isa, peak_share, precision_support, row_precision
from bgevl.benchmarks.peers import best_peers, fastest_project
from bgevl.benchmarks.report import apply_peaks, markdown, peer_comparisons

ZEN3 = """processor	: 0
vendor_id	: AuthenticAMD
cpu family	: 25
model		: 1
model name	: AMD EPYC 7B13
flags		: fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c avx2 fma bmi2 sha_ni vaes vpclmulqdq

processor	: 1
model name	: not the first one
flags		: avx512f avx512_bf16
"""
ZEN4 = """cpu family	: 25
model		: 17
model name	: AMD EPYC 9B14
flags		: avx f16c avx2 fma avx512f avx512dq avx512_vnni avx512_bf16 gfni
"""
SAPPHIRE_RAPIDS = """cpu family	: 6
model		: 143
model name	: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags		: avx2 fma f16c avx512f avx512_vnni avx512_bf16 avx512_fp16 avx_vnni amx_bf16 amx_tile amx_int8
"""


def test_cpu_isa_reads_the_first_processor_from_cpuinfo_text():
    assert cpu_isa(ZEN3) == {"model": "AMD EPYC 7B13", "family": "family 25 model 1", "flags": ["avx2", "fma", "f16c"]}
    assert cpu_isa(ZEN4)["flags"] == ["avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16"]
    assert cpu_isa(SAPPHIRE_RAPIDS)["flags"] == list(hardware.ISA_FLAGS)  # every tracked extension
    assert cpu_isa("") == {"model": "unknown CPU", "family": "", "flags": []}


def test_each_precision_says_what_computes_it_or_why_not():
    zen3 = cpu_isa(ZEN3)
    support = precision_support(zen3)
    assert support["fp32"] == {"native": True, "how": "AVX2+FMA"}
    assert support["bf16"] == {"native": False, "how": bf16_absent(zen3)}
    assert bf16_absent(zen3).startswith("AMD EPYC 7B13 has no bf16 instructions (no AVX512-BF16, no AMX-BF16)")
    assert "\n" not in bf16_absent(zen3)
    assert not support["int8"]["native"] and "no VNNI or AMX" in support["int8"]["how"]
    zen4 = precision_support(cpu_isa(ZEN4))
    assert zen4["fp32"]["how"] == "AVX-512 F" and zen4["bf16"] == {"native": True, "how": "AVX512-BF16"}
    assert zen4["int8"] == {"native": True, "how": "AVX512-VNNI"}
    spr = precision_support(cpu_isa(SAPPHIRE_RAPIDS))
    assert spr["bf16"]["how"] == "AMX-BF16" and spr["int8"]["how"] == "AMX-INT8"


def test_every_row_is_a_share_of_the_peak_of_its_own_precision():
    peaks = {"fp32": 200.0, "bf16": None, "int8": 800.0}
    assert [row_precision(b) for b in ("pytorch", "pytorch-compile", "onnxruntime-fp32", "onnxruntime-fp16",
                                       "openvino-f32")] == ["fp32"] * 5
    assert [row_precision(b) for b in ("pytorch-bf16", "pytorch-bf16-autocast", "openvino-bf16")] == ["bf16"] * 3
    assert [row_precision(b) for b in ("onnxruntime-int8-dynamic", "openvino-int8-u8")] == ["int8"] * 2
    assert row_precision("tensorrt-fp16") is None and row_precision("runtime") is None
    assert peak_share(150.0, "fp32", peaks) == pytest.approx(0.75)
    assert peak_share(200.0, "int8", peaks) == pytest.approx(0.25)
    assert peak_share(150.0, "bf16", peaks) is None  # emulated bf16: no peak, no share
    assert peak_share(150.0, None, peaks) is None
    data = {"hardware": {"matmul_peaks": peaks}, "results": [
        {"backend": "onnxruntime-fp32", "gflops": 100.0, "precision": "fp32", "peak_fraction": 9.9},
        {"backend": "onnxruntime-int8-dynamic", "gflops": 100.0, "precision": "int8"},
        {"backend": "openvino-bf16", "gflops": 100.0, "precision": "bf16", "peak_fraction": 3.52},
        {"backend": "triton", "precision": None}]}
    apply_peaks(data)
    assert [r.get("peak_fraction") for r in data["results"]] == [0.5, 0.125, None, None]


def _row(backend, p50, cosine, **kw):
    return {"model": "base", "workload": "image", "batch": 8, "backend": backend, "level": "model", "p50_ms": p50,
            "min_cosine_vs_pytorch": cosine, **kw}


def test_the_best_pytorch_variant_is_picked_per_accuracy_class():
    rows = [_row("pytorch", 1100.0, 1.0), _row("pytorch-compile", 900.0, 1.0), _row("pytorch-bf16", 260.0, 0.99995),
            _row("pytorch-bf16-autocast", 240.0, 0.9995), _row("onnxruntime-int8-dynamic", 100.0, 0.99992),
            _row("openvino-int8-u8", 90.0, 0.9998)]
    assert best_peers(rows) == {0.9999: "pytorch-bf16", 0.999: "pytorch-bf16-autocast"}
    assert best_peers(rows[:2]) == {0.9999: "pytorch-compile", 0.999: "pytorch-compile"}
    assert best_peers([_row("pytorch-bf16", 260.0, 0.998)]) == {0.9999: None, 0.999: None}
    assert fastest_project(rows, 0.9999)["backend"] == "onnxruntime-int8-dynamic"
    assert fastest_project(rows, 0.999)["backend"] == "openvino-int8-u8"
    assert fastest_project(rows, 0.99999) is None


def test_the_report_compares_with_the_best_peer_of_each_class_against_its_target():
    paired = {"p10": 1.1, "p90": 1.4, "won": 1.0, "rounds": 12, "inside_noise": False}
    rows = [_row("pytorch", 1100.0, 1.0), _row("pytorch-bf16", 260.0, 0.99995),
            _row("onnxruntime-int8-dynamic", 160.0, 0.99992, vs_best_pytorch={
                "0.9999": {"peer": "pytorch-bf16", "median": 1.6, **paired},
                "0.999": {"peer": "pytorch-bf16", "median": 1.6, **paired}})]
    comparisons = peer_comparisons({"results": rows}, "base")
    assert [(c["class"], c["peer"], c["backend"], c["target"], c["met"]) for c in comparisons] == [
        (0.9999, "pytorch-bf16", "onnxruntime-int8-dynamic", 1.0, True),
        (0.999, "pytorch-bf16", "onnxruntime-int8-dynamic", 2.0, False)]


def _bench(tmp_path, monkeypatch, cpuinfo: str, backends: str, peak_probes: dict | None = None) -> dict:
    """bgevl-bench on the tiny model with the CPU's ISA taken from ``cpuinfo`` and the matmul peaks injected
    (``peak_probes``: the probes said to have given them, timed beside the rows)."""
    from bgevl.benchmarks import cli

    support = precision_support(cpu_isa(cpuinfo))
    peaks = {"fp32": 100.0, "bf16": 400.0 if support["bf16"]["native"] else None, "int8": 200.0}  # as matmul_peaks
    monkeypatch.setattr(cli, "_hardware", lambda threads, sizes: {
        "cpu": cpu_isa(cpuinfo)["model"], "cpu_family": "", "isa": cpu_isa(cpuinfo)["flags"], "precisions": support, "logical_cores": 2, "physical_cores": 2, "memory_gb": 1.0,
        "machine": "x86_64", "matmul_peaks": dict(peaks), "matmul_probes_start": {}, "peak_probes": peak_probes or {}})
    monkeypatch.setattr(hardware, "matmul_peaks", lambda *a, **k: {**peaks, "probes": {}})
    out = tmp_path / "bench"
    rc = cli.main(["--models", "tiny", "--backends", backends, "--workloads", "text", "--batch-sizes", "2",
                   "--warmup", "1", "--min-repeats", "2", "--min-seconds", "0", "--output", str(out)])
    assert rc == 0
    return json.loads((out / "results.json").read_text())


def test_bf16_peers_are_left_out_in_one_line_where_the_cpu_has_no_bf16(tmp_path, monkeypatch):
    data = _bench(tmp_path, monkeypatch, ZEN3, "pytorch,pytorch-bf16,pytorch-bf16-autocast,onnxruntime-fp32")
    assert {r["backend"] for r in data["results"]} == {"pytorch", "onnxruntime-fp32"}
    assert bf16_absent(cpu_isa(ZEN3)) in data["notes"]
    report = markdown(data)
    assert f"* bf16: no peak reported; not native: {bf16_absent(cpu_isa(ZEN3))}" in report
    fp32 = next(r for r in data["results"] if r["backend"] == "onnxruntime-fp32")
    assert fp32["precision"] == "fp32" and fp32["peak_fraction"] == pytest.approx(fp32["gflops"] / 100.0)
    # the only PyTorch variant is fp32 eager: it is the best of both classes
    assert fp32["vs_best_pytorch"]["0.9999"]["peer"] == "pytorch" and fp32["vs_best_pytorch"]["0.999"]["peer"] == "pytorch"


def test_bf16_peers_run_where_the_cpu_has_bf16_and_count_against_the_bf16_peak(tmp_path, monkeypatch):
    data = _bench(tmp_path, monkeypatch, ZEN4, "pytorch,pytorch-bf16,pytorch-bf16-autocast,onnxruntime-fp32")
    rows = {r["backend"]: r for r in data["results"]}
    assert set(rows) == {"pytorch", "pytorch-bf16", "pytorch-bf16-autocast", "onnxruntime-fp32"}
    assert not any("bf16 instructions" in n for n in data["notes"])
    for name in ("pytorch-bf16", "pytorch-bf16-autocast"):
        # bf16 keeps 8 bits of mantissa: close to fp32, not equal (on a CPU without bf16 it is emulated, same numbers)
        assert 0.99 < rows[name]["min_cosine_vs_pytorch"] < 0.999999
        assert rows[name]["precision"] == "bf16"
        assert rows[name]["peak_fraction"] == pytest.approx(rows[name]["gflops"] / 400.0)
    best = best_peers(data["results"])
    assert rows["onnxruntime-fp32"]["vs_best_pytorch"]["0.9999"]["peer"] == best[0.9999]


def test_the_peak_probes_give_each_precision_its_own_figure_and_none_where_emulated():
    zen3 = precision_support(cpu_isa(ZEN3))
    peaks = hardware.matmul_peaks(1, sizes=(128,), repeats=1, support=zen3)
    assert peaks["fp32"] > 0 and peaks["int8"] > 0 and peaks["bf16"] is None  # no bf16 probe on an emulating CPU
    probes = peaks["probes"]
    assert {"fp32/torch_128", "fp32/onnxruntime_128", "int8/onnxruntime_128"} <= set(probes)
    assert not any(k.startswith("bf16/") for k in probes)
    assert peaks["fp32"] == max(v for k, v in probes.items() if k.startswith("fp32/"))
    assert peaks["int8"] == max(v for k, v in probes.items() if k.startswith("int8/"))


def test_the_profile_splits_a_graph_call_by_operator_type(export_dir, capsys):
    from bgevl.benchmarks.profile import main as profile_main, profile_onnxruntime, probe_feed, table
    from bgevl.core.manifest import read_manifest

    manifest = read_manifest(export_dir("fp32"))
    feed = probe_feed(manifest, "vision", 3)
    assert feed["pixel_values"].shape == (3, 3, 224, 224)
    per_op, wall = profile_onnxruntime(manifest.graph_path("vision"), feed, 1, 2)
    assert wall > 0 and per_op["Conv"] > 0 and {"MatMul", "FusedMatMul"} & set(per_op)
    lines = table({"MatMul": 300.0, "Add": 100.0}, 2, 0.5)
    assert lines[0] == "wall 500.0 ms per call (profiler on); node time 0.2 ms per call"
    assert lines[-2:] == ["| MatMul | 0.15 | 75.0% |", "| Add | 0.05 | 25.0% |"]
    assert profile_main([str(manifest.directory), "--graph", "text", "--batch", "2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"## {manifest.directory.name}: text on onnxruntime, input_ids [2, ") and "| MatMul |" in out
    assert profile_main([str(manifest.directory), "--graph", "nope"]) == 2


@pytest.mark.parametrize("static", [False, True])
def test_the_openvino_profile_counts_executed_nodes_with_their_kernels(export_dir, static):
    pytest.importorskip("openvino", reason="needs the openvino extra: pip install '.[openvino]'")
    from bgevl.benchmarks.profile import probe_feed, profile_openvino
    from bgevl.core.manifest import read_manifest

    manifest = read_manifest(export_dir("fp32"))
    per_op, wall = profile_openvino(manifest.graph_path("vision"), probe_feed(manifest, "vision", 2), 1, 2, "f32", static)
    assert wall > 0 and all(us >= 0 for us in per_op.values())
    assert any(name.startswith(("FullyConnected (", "MatMul (")) for name in per_op)  # "type (kernel)"


def test_each_timed_call_comes_right_after_a_lead_in_call_of_the_same_backend():
    """Rounds stay interleaved (pairing), and every timed call follows an untimed one of its own backend: the
    sequence of calls is warm-ups, then per round one (lead-in, timed) pair per backend; the figure kept is the
    timed call's (each call reports its own index as its time)."""
    from bgevl.benchmarks.measure import SelfTimed, interleaved

    log: list[str] = []

    def backend(name):
        def call():
            log.append(name)
            return SelfTimed(float(len(log)))
        return call

    timings = interleaved({"a": backend("a"), "b": backend("b"), "c": backend("c")}, warmup=1, min_repeats=4,
                          min_seconds=0, seed=3, lead_in=1)
    assert log[:3] == ["a", "b", "c"]
    rounds = log[3:]
    assert len(rounds) == 4 * 3 * 2 and all(rounds[i] == rounds[i + 1] for i in range(0, len(rounds), 2))
    orders = [tuple(rounds[r * 6:(r + 1) * 6:2]) for r in range(4)]
    assert all(sorted(o) == ["a", "b", "c"] for o in orders) and len(set(orders)) > 1  # drawn per round
    for name, timing in timings.items():  # the second call of each pair (1-based positions after the 3 warm-ups)
        assert len(timing.seconds) == 4 and all((s - 3) % 2 == 0 and log[int(s) - 1] == name for s in timing.seconds)
    log.clear()
    interleaved({"a": backend("a"), "b": backend("b")}, warmup=0, min_repeats=2, min_seconds=0, lead_in=0)
    assert len(log) == 4


def test_a_share_of_the_peak_paired_round_by_round_ignores_a_slower_spell_of_the_machine():
    from bgevl.benchmarks.hardware import paired_peak_share

    # a row at 50 % of a 100 GFLOP/s probe; in half the rounds the machine runs at a third of its speed
    slow = [1.0, 3.0, 1.0, 3.0, 3.0, 1.0]
    row = [0.2 * s for s in slow]  # 10 GFLOP in 0.2 s: 50 GFLOP/s
    probe = [0.01 * s for s in slow]  # 1 GFLOP in 0.01 s: 100 GFLOP/s
    assert paired_peak_share(10.0, row, 1.0, probe) == pytest.approx(0.5)
    # a slow round's time against the probe's best (a peak measured at the start of the run) reads a third of it
    assert 10.0 / sorted(row)[3] / (1.0 / min(probe)) == pytest.approx(1 / 6)


def test_the_bench_times_each_precisions_peak_probe_beside_the_rows_and_pairs_their_shares(tmp_path, monkeypatch):
    probes = {"fp32": "fp32/onnxruntime_128", "int8": "int8/onnxruntime_128"}
    data = _bench(tmp_path, monkeypatch, ZEN3, "pytorch,onnxruntime-fp32,onnxruntime-int8-dynamic", peak_probes=probes)
    rows = {r["backend"]: r for r in data["results"]}
    assert set(rows) == {"pytorch", "onnxruntime-fp32", "onnxruntime-int8-dynamic"}  # no probe is a result row
    for name, row in rows.items():
        assert row["peak_probe_gflops"] > 0 and row["peak_fraction"] == row["peak_fraction_paired"] > 0
        # the share of the run's injected peak is kept beside it
        peak = 200.0 if row["precision"] == "int8" else 100.0
        assert row["peak_fraction_of_run_peak"] == pytest.approx(row["gflops"] / peak)
    report = markdown(data)
    assert "* int8: peak 200 GOP/s (probe `int8/onnxruntime_128`, timed again beside the rows)" in report
    assert "each timed call right after 1 untimed call of the same backend" in report


def test_a_probe_made_again_by_name_computes_at_the_rate_the_peaks_report():
    from bgevl.benchmarks.hardware import probe_call

    for key in ("fp32/torch_64", "fp32/onnxruntime_64", "int8/onnxruntime_64"):
        call, flops = probe_call(key, threads=1)
        assert flops == 2 * 64 ** 3 and call() is not None
    with pytest.raises(ValueError, match="unknown matmul probe 'fp32/numpy_64'"):
        probe_call("fp32/numpy_64")


def test_the_findings_give_the_peak_shares_issue_36_asks_for():
    from bgevl.benchmarks.report import _peak_share_findings

    def row(backend, workload, batch, precision, share):
        return {"model": "base", "backend": backend, "workload": workload, "batch": batch, "precision": precision,
                "peak_fraction": share}

    rows = [row("pytorch-bf16-compile", "image", 1, "bf16", 0.9), row("openvino-bf16", "image", 1, "bf16", 0.8),
            row("onnxruntime-int8-u8", "image", 1, "int8", 0.6), row("openvino-int8-u8", "image", 8, "int8", 0.78),
            row("onnxruntime-int8-u8", "text", 8, "int8", 0.81), row("onnxruntime-int8-u8", "text", 1, "int8", 0.2)]
    assert _peak_share_findings("base", rows) == [
        "base, image at batch 1: 1 of 2 project rows at >= 75% of their own precision's peak (range 60%-80%)",
        "base, text at batch 1: 0 of 1 project rows at >= 75% of their own precision's peak (range 20%-20%)",
        "base, the best int8 row at batch 8: onnxruntime-int8-u8 on text at 81% of the int8 peak (target 80%, met)"]
