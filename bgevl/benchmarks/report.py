"""Benchmark reports: ``results.json`` (machine-readable), ``report.md`` (tables and the findings the
figures support, computed from them) and PNG plots (latency vs batch size per backend, Triton
throughput vs concurrency)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

MODEL_LEVEL, END_TO_END = "model", "end-to-end"


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def _fmt(value: Any, spec: str, missing: str = "") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return missing
    return format(value, spec)


def findings(data: dict[str, Any]) -> list[str]:
    """Sentences each backed by the rows they summarize (medians over workloads and batch sizes)."""
    out = []
    rows = data["results"]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        by: dict[str, list[dict[str, Any]]] = {}
        for r in mine:
            by.setdefault(r["backend"], []).append(r)
        for backend in [b for b in by if b.startswith(("onnxruntime", "tensorrt"))]:
            speedups = [r["speedup_vs_pytorch"] for r in by[backend] if r.get("speedup_vs_pytorch")]
            if not speedups:
                continue
            cos = min(r["min_cosine_vs_pytorch"] for r in by[backend])
            line = (f"{model}, {backend}: {statistics.median(speedups):.2f}x PyTorch eager (median of "
                    f"{len(speedups)} configurations, range {min(speedups):.2f}-{max(speedups):.2f}x)")
            fp32 = {(r["workload"], r["batch"]): r["p50_ms"] for r in by.get("onnxruntime-fp32", [])}
            versus = [fp32[(r["workload"], r["batch"])] / r["p50_ms"] for r in by[backend]
                      if (r["workload"], r["batch"]) in fp32]
            if backend != "onnxruntime-fp32" and versus:
                line += f", {statistics.median(versus):.2f}x ONNX Runtime fp32"
            out.append(line + f"; min cosine to PyTorch fp32 {cos:.5f}")
        comparisons = peer_comparisons(data, model)
        for threshold in dict.fromkeys(c["class"] for c in comparisons):
            mine = [c for c in comparisons if c["class"] == threshold]
            ratios = [c["paired"]["median"] for c in mine if c["paired"]]
            if ratios:
                out.append(f"{model}, min cosine >= {threshold}: the fastest project backend is {statistics.median(ratios):.2f}x "
                           f"the best PyTorch variant of the class (median of {len(ratios)} configurations, range "
                           f"{min(ratios):.2f}-{max(ratios):.2f}x; target {mine[0]['target']:.1f}x, met in "
                           f"{sum(c['met'] for c in mine)} of {len(mine)})")
        out += _peak_share_findings(model, [r for r in rows if r["model"] == model])
        if "triton" in by and "runtime" in by:
            batches = sorted({r["batch"] for r in by["triton"]})
            at = 8 if 8 in batches else batches[-1]  # the issue asks for batch 8; else the largest measured
            for r in by["triton"]:
                if r["batch"] != at:
                    continue
                direct = next((d for d in by["runtime"] if d["workload"] == r["workload"] and d["batch"] == at), None)
                if direct:
                    out.append(f"{model}, {r['workload']} at batch {at}: Triton p50 {r['p50_ms']:.1f} ms vs bgevl.runtime "
                               f"{direct['p50_ms']:.1f} ms, overhead {r['p50_ms'] - direct['p50_ms']:+.1f} ms "
                               f"({r['p50_ms'] / direct['p50_ms']:.2f}x), both including preprocessing")
        for r in by.get("api", []) + by.get("api-triton", []):  # the embeddings API over what it fronts
            for ref, paired in r.get("paired", {}).items():
                out.append(f"{model}, {r['workload']} at batch {r['batch']}: the embeddings API ({r['backend']}) "
                           f"{r[f'overhead_vs_{ref}_ms']:+.2f} ms ({r[f'overhead_vs_{ref}_pct']:+.1f} %) over {ref} at p50; "
                           f"paired {ref}/API time {_ratio(paired)}")
    return out


def _peak_share_findings(model: str, rows: list[dict[str, Any]]) -> list[str]:
    """The shares of their own precision's peak that issue 36 asks of the project's rows (targets in
    ``bgevl.benchmarks.peers``)."""
    from bgevl.benchmarks.peers import BATCH1_PEAK_SHARE, INT8_PEAK_SHARE, PYTORCH_ROWS

    mine = [r for r in rows if r.get("peak_fraction") and r["backend"] not in PYTORCH_ROWS]
    out = []
    for workload in dict.fromkeys(r["workload"] for r in mine if r["batch"] == 1):
        shares = [r["peak_fraction"] for r in mine if r["batch"] == 1 and r["workload"] == workload]
        out.append(f"{model}, {workload} at batch 1: {sum(s >= BATCH1_PEAK_SHARE for s in shares)} of {len(shares)} "
                   f"project rows at >= {BATCH1_PEAK_SHARE:.0%} of their own precision's peak (range "
                   f"{min(shares):.0%}-{max(shares):.0%})")
    largest = max((r["batch"] for r in mine), default=0)
    int8 = [r for r in mine if r.get("precision") == "int8" and r["batch"] == largest]
    if int8 and int8[0]["batch"] > 1:
        best = max(int8, key=lambda r: r["peak_fraction"])
        out.append(f"{model}, the best int8 row at batch {best['batch']}: {best['backend']} on {best['workload']} at "
                   f"{best['peak_fraction']:.0%} of the int8 peak (target {INT8_PEAK_SHARE:.0%}, "
                   f"{'met' if best['peak_fraction'] >= INT8_PEAK_SHARE else 'not met'})")
    return out


def hardware_lines(hw: dict[str, Any], threads: Any, sizes: Any) -> list[str]:
    """The CPU, its ISA and, per precision, what computes it and its measured matmul peak."""
    family = f" ({hw['cpu_family']})" if hw.get("cpu_family") else ""
    lines = [f"CPU: {hw['cpu']}{family}, ISA: {', '.join(hw.get('isa', [])) or 'none of the tracked extensions'}; "
             f"matmul peaks measured in this run ({threads} threads; the best of torch, ONNX Runtime and OpenVINO "
             f"square-matmul probes at sizes {sizes}, at the start and the end of the run):", ""]
    for precision, support in hw.get("precisions", {}).items():
        peak = hw["matmul_peaks"].get(precision)
        unit = "GOP/s" if precision == "int8" else "GFLOP/s"
        probe = hw.get("peak_probes", {}).get(precision)
        figure = (f"peak {peak:.0f} {unit}" + (f" (probe `{probe}`, timed again beside the rows)" if probe else "")
                  if peak else "no peak reported")
        kind = "native" if support["native"] else "not native"
        lines.append(f"* {precision}: {figure}; {kind}: {support['how']}")
    return lines + [""]


def apply_peaks(data: dict[str, Any]) -> None:
    """Every model-level row's share of the matmul peak of the precision it computes in (``peak_fraction``):
    paired round by round with that precision's peak probe where it was timed beside the row
    (``peak_fraction_paired``), else over the run's best peak (``peak_fraction_of_run_peak``, kept either way);
    absent where that peak is not measured (GPU rows, emulated bf16)."""
    from bgevl.benchmarks.hardware import peak_share

    peaks = data["hardware"].get("matmul_peaks", {})
    for row in data["results"]:
        share = peak_share(row["gflops"], row.get("precision"), peaks) if row.get("gflops") else None
        if share is None:
            row.pop("peak_fraction_of_run_peak", None)
        else:
            row["peak_fraction_of_run_peak"] = share
        share = row.get("peak_fraction_paired", share)
        if share is None:
            row.pop("peak_fraction", None)
        else:
            row["peak_fraction"] = share


def _lead_in(calls: int) -> str:
    if not calls:
        return " (no lead-in: a timed call may run against the previous backend's still-spinning threads)"
    return (f", each timed call right after {calls} untimed call{'s' if calls > 1 else ''} of the same backend "
            "(its own thread pool awake, the previous backend's gone idle: bgevl.benchmarks.measure)")


def markdown(data: dict[str, Any]) -> str:
    hw, sw = data["hardware"], data["software"]
    lines = [
        f"# bgevl-bench results ({data['label']})",
        "",
        f"{data['created']} · {hw['cpu']} · {hw['logical_cores']} logical / {hw['physical_cores']} physical cores · "
        f"{hw['memory_gb']:.0f} GB",
        "",
        *hardware_lines(hw, data["settings"]["threads"], ", ".join(map(str, data["settings"].get("peak_sizes", [])))),
        "Software: " + ", ".join(f"{k} {v}" for k, v in sw.items()),
        "",
        f"Command: `{data['command']}`",
        "",
        "Model level: preprocessed tensors in, embeddings out; `x PyTorch` is PyTorch eager's p50 over this "
        "backend's, measured interleaved in the same run. End-to-end: image files and strings in, "
        "preprocessing included. GFLOP/s: the matmul/conv FLOPs of the exported float graphs, attention "
        "included, counted from the operand shapes of a real call, padding included (bgevl.benchmarks.flops), over p50; "
        "`% own peak` is that over the matmul peak of the precision the row computes in (`prec.`: "
        "fp32, bf16 or int8; int8 rows are counted in the float graph's FLOPs over the int8 GOP/s peak; empty "
        "where that precision has no measured peak), paired: the probe that gave that peak above is timed in the "
        "same rounds as the rows and the share is the median of the per-round ratios of the two rates, so that a "
        "slower spell of the machine moves both alike. `% best peak`: the same GFLOP/s over the peak above, the "
        "best of the probes at the start and the end of the run; it reads lower, a p50 over a best. Peak RSS is process-wide while the backend ran (all loaded backends' "
        "weights included; Triton adds its server's process tree).",
        "",
        f"Timing: {hw.get('allocator', 'allocator not recorded')} (`pytorch-plain`, where it ran, is the "
        "same PyTorch baseline in a child process with malloc untouched, timed in that process). Every "
        "backend of a configuration is called once per round in a random order drawn per round"
        + _lead_in(data["settings"].get("lead_in", 0)) + "; ratios "
        "are paired round by round: median [p10-p90] and the share of rounds won; `~` marks a spread "
        "that includes 1 (a difference inside this machine's noise).",
        "",
    ]
    if data.get("notes"):
        lines += [f"* {n}" for n in data["notes"]] + [""]
    lines += ["## Findings", ""] + [f"* {f}" for f in findings(data)] + [""]
    for model in dict.fromkeys(r["model"] for r in data["results"]):
        lines += [f"## {model}", "",
                  "| workload | batch | backend | level | p50 ms | p90 ms | p99 ms | items/s | tokens/s | x PyTorch | min cos vs PyTorch | GFLOP/s | prec. | % own peak | % best peak | peak RSS MB |",
                  "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
        for r in (r for r in data["results"] if r["model"] == model):
            lines.append(
                f"| {r['workload']} | {r['batch']} | {r['backend']} | {r['level']} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | "
                f"{r['p99_ms']:.2f} | {r['items_per_s']:.1f} | {_fmt(r.get('tokens_per_s'), '.0f')} | "
                f"{_fmt(r.get('speedup_vs_pytorch'), '.2f')} | "
                f"{_fmt(r.get('min_cosine_vs_pytorch'), '.5f')} | {_fmt(r.get('gflops'), '.1f')} | {r.get('precision') or ''} | "
                f"{_fmt(r.get('peak_fraction'), '.1%')} | {_fmt(r.get('peak_fraction_of_run_peak'), '.1%')} | "
                f"{_fmt(r.get('peak_rss_mb'), '.0f')} |")
        lines += _peer_table(data, model) + _paired_table(data, model) + _pareto_table(data, model)
        sweep = [s for s in data.get("triton_sweep", []) if s["model"] == model]
        if sweep:
            client = sweep[0].get("client", "bgevl-bench threads (HTTP)")
            lines += ["", f"Triton concurrency sweep ({model}, batch {sweep[0]['batch']} per request, measured with {client}):", "",
                      "| workload | concurrency | requests | items/s | p50 ms | p90 ms | p99 ms |",
                      "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
            lines += [f"| {s['workload']} | {s['concurrency']} | {_fmt(s.get('requests'), 'd')} | {s['items_per_s']:.1f} | "
                      f"{s['p50_ms']:.1f} | {_fmt(s.get('p90_ms'), '.1f')} | {s['p99_ms']:.1f} |" for s in sweep]
        lines.append("")
        if model in data.get("quality", {}):
            from bgevl.quality.evaluate import markdown as quality_markdown

            # the same tables as bgevl-eval's report, one heading level down
            lines += ["#" + line if line.startswith("#") else line
                      for line in quality_markdown(data["quality"][model]).splitlines()] + [""]
    plots = data.get("plots", [])
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    return "\n".join(lines)


def _ratio(paired: dict[str, Any] | None) -> str:
    if not paired:
        return ""
    mark = "~" if paired["inside_noise"] else ""
    return f"{mark}{paired['median']:.2f}x [{paired['p10']:.2f}-{paired['p90']:.2f}] {paired['won']:.0%}"


def peer_comparisons(data: dict[str, Any], model: str) -> list[dict[str, Any]]:
    """Per workload, batch and accuracy class: the best PyTorch variant, the fastest project backend of the
    class, their paired ratio and the class's target (``bgevl.benchmarks.peers.ACCURACY_CLASSES``)."""
    from bgevl.benchmarks.peers import ACCURACY_CLASSES, best_peers, fastest_project

    rows = [r for r in data["results"] if r["model"] == model and r["level"] == MODEL_LEVEL]
    out = []
    for key in dict.fromkeys((r["workload"], r["batch"]) for r in rows):
        group = [r for r in rows if (r["workload"], r["batch"]) == key]
        for threshold, peer in best_peers(group).items():
            mine = fastest_project(group, threshold)
            if peer is None or mine is None:
                continue
            paired = mine.get("vs_best_pytorch", {}).get(str(threshold))
            out.append({"workload": key[0], "batch": key[1], "class": threshold, "peer": peer,
                        "peer_ms": next(r["p50_ms"] for r in group if r["backend"] == peer), "backend": mine["backend"],
                        "ms": mine["p50_ms"], "cosine": mine["min_cosine_vs_pytorch"], "paired": paired,
                        "target": ACCURACY_CLASSES[threshold],
                        "met": bool(paired and paired["median"] >= ACCURACY_CLASSES[threshold])})
    return out


def _peer_table(data: dict[str, Any], model: str) -> list[str]:
    comparisons = peer_comparisons(data, model)
    if not comparisons:
        return []
    lines = ["", f"Against the best PyTorch variant of each accuracy class ({model}, model level; class: min cosine to "
                 "PyTorch fp32 at least this; the PyTorch variants measured in this run compete, fp32 eager included):", "",
             "| workload | batch | class | best PyTorch | p50 ms | fastest project backend | p50 ms | min cos | paired ratio | target | met |",
             "| --- | ---: | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | :---: |"]
    lines += [f"| {c['workload']} | {c['batch']} | >= {c['class']} | {c['peer']} | {c['peer_ms']:.2f} | {c['backend']} | "
              f"{c['ms']:.2f} | {c['cosine']:.5f} | {_ratio(c['paired'])} | {c['target']:.1f}x | {'yes' if c['met'] else 'no'} |"
              for c in comparisons]
    return lines


def _paired_table(data: dict[str, Any], model: str) -> list[str]:
    rows = [r for r in data["results"] if r["model"] == model and r.get("paired")]
    references = list(dict.fromkeys(ref for r in rows for ref in r["paired"]))
    if not rows or not references:
        return []
    lines = ["", f"Paired per-round ratios ({model}): how many times faster than each reference, median [p10-p90], "
                 "share of rounds won:", "",
             "| workload | batch | backend | " + " | ".join(f"vs {ref}" for ref in references) + " |",
             "| --- | ---: | --- | " + " | ".join("---:" for _ in references) + " |"]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['batch']} | {r['backend']} | "
                     + " | ".join(_ratio(r["paired"].get(ref)) for ref in references) + " |")
    return lines


def pareto(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows no other row beats on both speed (p50) and accuracy (min cosine to PyTorch fp32; a cosine over 1 by
    float rounding counts as 1, or a compiled fp32 graph at 1.0000001 would outrank fp32 eager's 1)."""
    def cos(row):
        return min(row["min_cosine_vs_pytorch"], 1.0)

    return [r for r in rows if not any(o["p50_ms"] < r["p50_ms"] and cos(o) >= cos(r) for o in rows if o is not r)]


def _pareto_table(data: dict[str, Any], model: str) -> list[str]:
    rows = [r for r in data["results"] if r["model"] == model and r["level"] == MODEL_LEVEL
            and r.get("min_cosine_vs_pytorch") is not None]
    if not rows:
        return []
    lines = ["", f"Speed against accuracy ({model}, model level; `*`: on the Pareto front, nothing else is both faster "
                 "and at least as accurate):", "",
             "| workload | batch | backend | p50 ms | min cos vs PyTorch fp32 | Pareto |", "| --- | ---: | --- | ---: | ---: | :---: |"]
    for key in dict.fromkeys((r["workload"], r["batch"]) for r in rows):
        group = sorted((r for r in rows if (r["workload"], r["batch"]) == key), key=lambda r: r["p50_ms"])
        front = pareto(group)
        lines += [f"| {r['workload']} | {r['batch']} | {r['backend']} | {r['p50_ms']:.2f} | {r['min_cosine_vs_pytorch']:.5f} | "
                  f"{'*' if r in front else ''} |" for r in group]
    return lines


def _integer_log_axis(ax, ticks: list[int]) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(ScalarFormatter())


def plots(data: dict[str, Any], directory: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for model in dict.fromkeys(r["model"] for r in data["results"]):
        rows = [r for r in data["results"] if r["model"] == model]
        workloads = list(dict.fromkeys(r["workload"] for r in rows))
        fig, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 4), squeeze=False)
        for ax, workload in zip(axes[0], workloads):
            for backend in dict.fromkeys(r["backend"] for r in rows):
                pts = sorted((r["batch"], r["p50_ms"]) for r in rows if r["workload"] == workload and r["backend"] == backend)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=backend)
            ax.set(title=f"{model}: {workload}", xlabel="batch size", ylabel="p50 latency (ms)", yscale="log")
            _integer_log_axis(ax, sorted({r["batch"] for r in rows}))
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        path = directory / f"latency_{model}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path.name)
        sweep = [s for s in data.get("triton_sweep", []) if s["model"] == model]
        if sweep:
            fig, ax = plt.subplots(figsize=(5, 4))
            for workload in dict.fromkeys(s["workload"] for s in sweep):
                pts = sorted((s["concurrency"], s["items_per_s"]) for s in sweep if s["workload"] == workload)
                ax.plot(*zip(*pts), marker="o", label=workload)
            ax.set(title=f"{model}: Triton throughput", xlabel="client concurrency", ylabel="items/s")
            _integer_log_axis(ax, sorted({s["concurrency"] for s in sweep}))
            ax.grid(True, alpha=0.3)
            ax.legend()
            fig.tight_layout()
            path = directory / f"triton_{model}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path.name)
    return written


def write_reports(data: dict[str, Any], directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    try:
        data["plots"] = plots(data, directory)
    except ImportError:
        data["plots"] = []
        data.setdefault("notes", []).append("no plots: matplotlib is not installed (pip install 'bgevl-export[bench]')")
    apply_peaks(data)
    paths = {"json": write_json(directory / "results.json", data), "markdown": directory / "report.md"}
    paths["markdown"].write_text(markdown(data))
    return paths
