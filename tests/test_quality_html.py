"""``bgevl-eval --html``: the page renders in a real browser (Debian's headless Chromium): it loads without a
console error, every thumbnail decodes, and it shows what the report says changed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium; .ci/run installs it)")
def test_the_html_report_renders_in_headless_chromium(export_dir, tmp_path):
    from bgevl.export.cli import main as export_main
    from bgevl.quality.cli import main as eval_main
    from bgevl.quality.synthetic import write_quality_data

    export = tmp_path / "export"
    shutil.copytree(export_dir("fp32"), export)
    assert export_main(["ranges", str(export), "--size", "16"]) == 0
    write_quality_data(str(tmp_path / "data"), bases=8, variants=2, pairs=16)
    page = tmp_path / "report.html"
    assert eval_main(["--export", str(export), "--data", str(tmp_path / "data"), "--embedding-dtype", "int8,ubinary",
                      "--html", str(page), "--json", str(tmp_path / "report.json"), "--examples", "3", "--quiet"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    changed = [e for run in report["runs"][1:] for task in run["tasks"].values() for e in task["changed"]]
    assert changed and all(0 <= e["overlap"] < 1 and len(e["run"]) == len(e["reference"]) for e in changed)

    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
                           "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    rendered = re.search(r'data-rendered="(\d+)/(\d+)"', done.stdout)
    assert rendered is not None, done.stdout[:2000]
    ok, total = map(int, rendered.groups())
    assert ok == total and total >= 3 * 2 * 10  # every thumbnail decoded: at least two ranked rows of 10 per example
    for example in changed[:3]:
        assert f'title="{example["query"]}"' in done.stdout  # each example's query is on the page
    assert done.stdout.count("<table>") == len(report["runs"][0]["tasks"])  # a metric table per task
