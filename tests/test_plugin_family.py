"""A fourth model family registered from outside ``bgevl`` (``tests/plugins/bgevl_siglip_like``: a CLIP
subclass with another image size and processor settings) is exported, validated and served by the
public commands, through the entry-point group ``bgevl.families`` alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

PLUGINS = Path(__file__).parent / "plugins"
KEY = "tiny-siglip-like"


def _env(*paths: Path) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, paths))}


def _run(args: list[str], *paths: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=_env(*(paths or (PLUGINS,))), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def plugin_export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plugin") / "siglip-fp16"
    done = _run(["-m", "bgevl.export.cli", "--model", KEY, "--precision", "fp16", "--output", str(out),
                 "--siglip-note", "from the plug-in's own option"])
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_the_plugin_is_a_model_choice_with_its_option_group_in_help():
    done = _run(["-m", "bgevl.export.cli", "--help"])
    assert done.returncode == 0 and done.stderr == ""
    assert KEY in done.stdout and "siglip-like family (tiny-siglip-like):" in done.stdout and "--siglip-note" in done.stdout
    without = _run(["-m", "bgevl.export.cli", "--help"], Path("/nonexistent"))
    assert KEY not in without.stdout and "--siglip-note" not in without.stdout


def test_the_plugin_exports_and_validates_at_its_own_image_size(plugin_export):
    manifest = json.loads((plugin_export / "manifest.json").read_text())
    assert manifest["model"]["family"] == "siglip-like" and manifest["model"]["key"] == KEY
    assert manifest["model"]["details"]["siglip_note"] == "from the plug-in's own option"
    pixels = next(t for t in manifest["graphs"]["vision"]["inputs"] if t["name"] == "pixel_values")
    assert pixels["shape"][1:] == [3, 64, 64]
    files = plugin_export / manifest["processor_dir"]
    processor = json.loads((files / "preprocessor_config.json").read_text()) if (
        files / "preprocessor_config.json").is_file() else json.loads((files / "processor_config.json").read_text())["image_processor"]
    assert processor["do_center_crop"] is False and processor["image_mean"] == [0.5, 0.5, 0.5]
    figures = manifest["validation"]["figures"]
    assert set(figures) == {"image", "text", "composed"}
    assert all(f["min_cosine"] >= 0.999 for f in figures.values()), figures
    # the driver's steps, with their status and timings
    assert [(step["name"], step["status"]) for step in manifest["pipeline"]] == [
        ("load", "done"), ("onnx-export", "done"), ("precision", "done"), ("validation", "done"), ("manifest", "done")]
    assert all(step["seconds"] >= 0 for step in manifest["pipeline"])


def test_the_plugin_is_served_by_the_embeddings_api(plugin_export):
    from samples import api_process

    texts = ["a photo of a cat", "two dogs on a beach"]
    with api_process(plugin_export, _env(PLUGINS)) as client:
        served = np.array([d.embedding for d in client.embeddings.create(model=client.models.list().data[0].id,
                                                                          input=texts, encoding_format="float").data])
    # the runtime's embeddings of the same texts, computed in another process with the plug-in on its path
    script = ("import json, sys; from bgevl.runtime import Embedder; "
              f"e = Embedder.load({str(plugin_export)!r}); "
              f"print(json.dumps(e.encode(text={texts!r}).tolist()))")
    direct = _run(["-c", script])
    assert direct.returncode == 0, direct.stderr[-2000:]
    direct = np.array(json.loads(direct.stdout))
    assert served.shape == (2, 24)
    assert np.min(np.sum(served * direct, axis=1)) >= 0.9999


def test_a_broken_plugin_is_one_line_and_the_others_keep_working(tmp_path):
    info = tmp_path / "bgevl_broken-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bgevl-broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[bgevl.families]\nbroken = no_such_module:Family\n")
    done = _run(["-m", "bgevl.export.cli", "--help"], tmp_path)
    assert done.returncode == 0 and "tiny-mllm" in done.stdout
    assert done.stderr.splitlines() == ["bgevl: model family plug-in 'broken' (no_such_module:Family) could not be "
                                        "loaded: ModuleNotFoundError: No module named 'no_such_module'"]
    asked = _run(["-c", "from bgevl.core.registry import get_family; get_family('broken')"], tmp_path)
    assert asked.returncode == 1 and asked.stderr.strip().splitlines()[-1].endswith(
        "BgevlError: model family plug-in 'broken' (no_such_module:Family) could not be loaded: ModuleNotFoundError: "
        "No module named 'no_such_module'")


def test_a_plugin_cannot_take_a_built_in_familys_name_or_end_the_tools(tmp_path):
    """A plug-in registering the entry-point name 'clip' silently replaced the built-in family; one whose family is
    named 'clip' made the built-in be reported broken; one calling sys.exit(7) at import made every tool exit 7."""
    (tmp_path / "takeover.py").write_text(
        "from bgevl.families.clip import ClipFamily\n"
        "class Takeover(ClipFamily):\n    description = 'not the built-in'\n    models = ()\n")
    (tmp_path / "leaving.py").write_text("import sys\nsys.exit(7)\n")
    info = tmp_path / "bgevl_hostile-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bgevl-hostile\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[bgevl.families]\nclip = takeover:Takeover\nsame-name = takeover:Takeover\n"
                                           "leaving = leaving:Family\n")
    done = _run(["-m", "bgevl.export.cli", "--help"], tmp_path)
    assert done.returncode == 0 and "tiny-mllm" in done.stdout, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 3, lines
    assert "plug-in 'clip' (takeover:Takeover) was not loaded: 'clip' is a built-in family's entry-point name" in lines[0]
    assert any("plug-in 'same-name' (takeover:Takeover) could not be loaded: BgevlError: model family 'clip' is "
               "registered twice" in line for line in lines)
    assert any("plug-in 'leaving' (leaving:Family) could not be loaded: SystemExit: 7" in line for line in lines)
    which = _run(["-c", "from bgevl.core.registry import get_family; f = get_family('clip'); "
                        "print(type(f).__module__, len(f.models))"], tmp_path)
    assert which.returncode == 0 and which.stdout.split() == ["bgevl.families.clip", "3"]
