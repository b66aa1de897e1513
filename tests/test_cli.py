"""The command line: messages and exit codes for failures, nothing half-written, local checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from bgevl.export.cli import main
from bgevl.core.probes import synthetic_images


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bgevl.export.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=600)


@pytest.mark.parametrize("model", ["base", "large", "mllm-s2", "mllm-v1.5-zs"])
def test_hub_models_without_network_fail_at_once_naming_model_path(model, tmp_path):
    # An empty cache and a hub endpoint on a closed local port: the same failure as no network.
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}
    result = run_cli("--model", model, "--precision", "fp16", "--output", str(tmp_path / "out"), env=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    hub_id = {"base": "BAAI/BGE-VL-base", "large": "BAAI/BGE-VL-large", "mllm-s2": "BAAI/BGE-VL-MLLM-S2",
              "mllm-v1.5-zs": "BAAI/BGE-VL-v1.5-zs"}[model]
    assert hub_id in result.stderr and "--model-path" in result.stderr
    message = [line for line in result.stderr.splitlines() if line.startswith("bgevl-export: error:")]
    assert len(message) == 1, result.stderr  # one paragraph
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_hf_hub_offline_is_respected(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    result = run_cli("--model", "base", "--output", str(tmp_path / "out"), env=env)
    assert result.returncode == 2 and "HF_HUB_OFFLINE" in result.stderr and "--model-path" in result.stderr


def test_missing_model_path_is_named(tmp_path, capsys):
    assert main(["--model", "base", "--model-path", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--model-path" in err and "no such directory" in err
    (tmp_path / "empty").mkdir()
    assert main(["--model", "base", "--model-path", str(tmp_path / "empty"), "--output", str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_local_checkpoint_through_model_path(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "local"
    # --model base would refuse this checkpoint (its sizes are not BGE-VL-base's: tests/test_hub_checkpoints.py);
    # the generated spec tiny takes a CLIP checkpoint of any size
    assert main(["--model", "tiny", "--model-path", str(tiny_checkpoint), "--output", str(out), "-q"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["source"] == f"local:{tiny_checkpoint.resolve()}"
    assert manifest["model"]["weights"] == "pretrained"  # thresholds enforced as for a real checkpoint
    assert manifest["command"] == f"bgevl-export --model tiny --model-path {tiny_checkpoint} --output {out} -q"
    assert manifest["validation"]["passed"] is True
    assert capsys.readouterr().out.strip() == str(out.resolve())


def test_failed_validation_prints_figures_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "strict"
    code = main(["--model", "tiny", "--precision", "int8", "--min-cosine", "1.01", "--output", str(out), "-q"])
    err = capsys.readouterr().err
    assert code == 2
    assert "failed validation (min cosine must be >= 1.01)" in err
    for kind in ("image", "text", "composed"):
        assert f"  {kind} " in err
    assert "--no-validate" in err and "--calibration-data" in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_no_validate_skips_validation(tmp_path):
    out = tmp_path / "nv"
    assert main(["--model", "tiny", "--no-validate", "--min-cosine", "1.01", "--output", str(out), "-q"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["validation"] == {"performed": False}


def test_refuses_non_empty_output_without_overwrite(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["--model", "tiny", "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_int8_with_calibration_directory(tmp_path, tiny_reference):
    cal = tmp_path / "cal"
    cal.mkdir()
    for i, image in enumerate(synthetic_images(6, seed=99)):
        image.save(cal / f"img{i}.png")
    (cal / "captions.txt").write_text("a red square\n\na blue circle on grass\nmake it night\n")
    out = tmp_path / "int8cal"
    assert main(["--model", "tiny", "--precision", "int8", "--calibration-data", str(cal), "--output", str(out), "-q"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["calibration"] == {"source": str(cal.resolve()), "images": 6, "texts": 3}
    assert manifest["validation"]["passed"] is True


def test_calibration_directory_without_captions_is_explained(tmp_path, capsys):
    cal = tmp_path / "cal"
    cal.mkdir()
    Image.new("RGB", (32, 32)).save(cal / "a.png")
    assert main(["--model", "tiny", "--precision", "int8", "--calibration-data", str(cal), "--output", str(tmp_path / "o")]) == 2
    assert "found 1 images and 0 captions" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_help_lists_models_and_precisions():
    result = run_cli("--help")
    assert result.returncode == 0
    for word in ("tiny", "base", "large", "fp32", "fp16", "int8", "--model-path", "--calibration-data"):
        assert word in result.stdout


def test_mllm_fp32_refused_without_force_and_flags_parse(tmp_path, capsys):
    code = main(["--model", "mllm-s1", "--precision", "fp32", "--max-sequence-length", "3500", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "--force-fp32" in err and "--precision fp16" in err
    assert not (tmp_path / "o").exists()


def test_export_with_triton_repo_and_the_packaging_subcommand(tmp_path, capsys, export_dir):
    from bgevl.serving.configs import parse_pbtxt

    repo = tmp_path / "repo"
    assert main(["--model", "tiny", "--output", str(tmp_path / "export"), "--triton-repo", str(repo), "--quiet"]) == 0
    assert parse_pbtxt((repo / "bgevl" / "config.pbtxt").read_text()).backend == "python"
    # a non-empty --triton-repo is refused before minutes of exporting, not after
    assert main(["--model", "tiny", "--output", str(tmp_path / "again"), "--triton-repo", str(repo)]) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()
    # the subcommand packages an existing export, here with onnxruntime encoders and another name
    packaged = tmp_path / "ort"
    assert main(["triton-repo", str(export_dir("fp16")), "--output", str(packaged), "--triton-backend", "onnxruntime",
                 "--triton-name", "clip"]) == 0
    config = parse_pbtxt((packaged / "clip_vision" / "config.pbtxt").read_text())
    assert config.platform == "onnxruntime_onnx" and (packaged / "clip_vision/1" / config.default_model_filename).is_file()
    assert main(["triton-repo", str(tmp_path / "missing"), "--output", str(tmp_path / "x")]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_overwrite_replaces_only_a_previous_export(tmp_path, capsys):
    """--overwrite must not delete a directory of someone else's files."""
    out = tmp_path / "work"
    (out / "src").mkdir(parents=True)
    (out / "thesis.txt").write_text("four years")
    assert main(["--model", "tiny", "--output", str(out), "--overwrite", "-q"]) == 2
    err = capsys.readouterr().err
    assert "is not empty and does not hold a bgevl export (manifest.json)" in err and "nothing was deleted" in err
    assert (out / "thesis.txt").read_text() == "four years" and (out / "src").is_dir()
    export = tmp_path / "export"
    assert main(["--model", "tiny", "--output", str(export), "-q", "--no-validate"]) == 0
    assert main(["--model", "tiny", "--output", str(export), "-q", "--no-validate", "--overwrite"]) == 0


def test_outputs_get_the_users_umask_and_unwritable_outputs_are_one_line(tmp_path, capsys):
    import stat

    old = os.umask(0o022)
    try:
        out = tmp_path / "shared"
        assert main(["--model", "tiny", "--output", str(out), "-q", "--no-validate"]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # readable by a Triton container running as another user
    capsys.readouterr()
    assert main(["--model", "tiny", "--output", "/proc/bgevl-nowhere/out", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bgevl-export: error: cannot write /proc/bgevl-nowhere/out")


def test_sigterm_cleans_up_like_ctrl_c(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "bgevl.export.cli", "--model", "tiny", "--output", str(out)],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp)})
    for line in proc.stderr:
        if line.startswith("[2/6]"):  # exporting: the staging and work directories exist now
            break
    assert list(tmp.iterdir()) and list(tmp_path.glob(".out.partial-*"))
    proc.terminate()
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130 and "interrupted; nothing was written" in rest
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*")) and not list(tmp.iterdir())


def test_help_shows_the_whole_tool_and_each_command_its_example(capsys, tmp_path):
    from bgevl.export.cli import COMMANDS

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    commands = out[out.index("commands:"):out.index("options:")]
    for name, (summary, example, _) in COMMANDS.items():
        assert f"    {name} " in commands and example in out  # every subcommand, with an example
    assert "--model-path" in out and "--triton-repo" in out  # and the export options of the bare form
    for name, (_, example, _) in COMMANDS.items():
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: bgevl-export {name} ") and f"example:\n  {example}" in out
    # `export` is the bare form spelled out: the same options, the same one-line refusals
    assert main(["export", "--model", "tiny", "--max-sequence-length", "8", "--output", str(tmp_path / "o")]) == 2
    assert "--max-sequence-length 8: need at least 16 tokens" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_an_interrupt_lost_in_a_finalizer_still_ends_the_run_as_interrupted():
    """A signal whose KeyboardInterrupt is raised inside ``__del__`` is dropped by Python (which would print
    "Exception ignored" with a traceback); the tool still ends as interrupted, at its next progress line (or
    when its body returns), in one line, exit 130."""
    import subprocess
    import sys

    script = """
import gc, os, signal, sys
from bgevl.core.interrupts import raise_if_interrupted, run_cli

class Finalized:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs here, in the finalizer, where its exception is dropped
            pass

def body():
    Finalized()
    gc.collect()
    print("after the finalizer", flush=True)
    raise_if_interrupted()
    print("not reached", flush=True)
    return 0

sys.exit(run_cli("tool", body, "interrupted; cleaned up"))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 130, done.stderr
    assert done.stdout.splitlines() == ["after the finalizer"]
    assert done.stderr.strip().splitlines() == ["tool: interrupted; cleaned up"]  # no "Exception ignored" traceback


def test_an_interrupt_that_passed_through_embedded_code_still_exits_130(tmp_path):
    """A signal that lands while a C extension runs code through ``PyRun_String`` (Cython modules do when
    imported, and an export imports lazily) left CPython's unhandled-interrupt flag set: the tool printed its
    line, returned 130, and the interpreter then killed itself with SIGINT (-2; seen in CI). The script below
    raises the interrupt inside ``PyRun_String`` the same way, by the handler of a real SIGTERM, and runs as
    ``python -m`` (the interpreter checks the flag on that path; a script file's SystemExit ends it before)."""
    import subprocess
    import sys

    script = """
import ctypes, os, signal, sys
from bgevl.core.interrupts import run_cli

run = ctypes.pythonapi.PyRun_StringFlags
run.restype, run.argtypes = ctypes.py_object, [ctypes.c_char_p, ctypes.c_int, ctypes.py_object, ctypes.py_object, ctypes.c_void_p]

def body():
    run(b"import os, signal; os.kill(os.getpid(), signal.SIGTERM)\\nfor _ in range(1000): pass", 257, {}, {}, None)
    return 0

sys.exit(run_cli("tool", body, "interrupted"))
"""
    (tmp_path / "interrupted_tool.py").write_text(script)
    done = subprocess.run([sys.executable, "-m", "interrupted_tool"], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().splitlines() == ["tool: interrupted"]


def test_every_command_line_ends_an_error_the_same_way():
    """run_cli is the one error path: a BgevlError is '<tool>: error: <message>' and exit 2, in every tool."""
    import ast

    import bgevl
    from bgevl.core.errors import BgevlError
    from bgevl.core.interrupts import run_cli

    def body() -> int:
        raise BgevlError("the message")

    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert run_cli("bgevl-tool", body) == 2
    assert err.getvalue() == "bgevl-tool: error: the message\n"
    # no tool prints its own 'error:' line for a BgevlError any more
    cli_modules = [Path(bgevl.__file__).parent / p for p in ("export/cli.py", "api/cli.py", "corpus/cli.py",
                                                           "quality/cli.py", "serving/cli.py", "benchmarks/cli.py",
                                                           "benchmarks/corpus.py")]
    for path in cli_modules:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ExceptHandler) and isinstance(node.type, ast.Name) and node.type.id == "BgevlError":
                printed = any(isinstance(n, ast.Call) and getattr(n.func, "id", "") == "print" for n in ast.walk(node))
                assert not printed, f"{path}:{node.lineno} prints its own error line; raise to run_cli instead"
