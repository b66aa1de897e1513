"""Outputs have one writer at a time and never lose a file the writer did not create: exports and
repositories lock their output for the whole run (a second writer is refused in one line naming the flag
that named the path) and re-check it just before the final rename."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bgevl.core.errors import BgevlError
from bgevl.export import ExportOptions, run_export
from bgevl.serving.repository import write_repository

HOLDER = ("import sys\nfrom bgevl.core.staging import output_lock\n"
          "with output_lock(sys.argv[1], sys.argv[2]):\n    print('held', flush=True)\n    sys.stdin.read()\n")


class Holder:
    """Another process holding the lock of ``path`` until closed."""

    def __init__(self, path: Path, option: str):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), option], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"

    def close(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bgevl.export.cli", *args], capture_output=True, text=True, timeout=300)


def test_a_second_writer_is_refused_in_one_line_naming_its_flag(tmp_path, export_dir):
    out, repo = tmp_path / "out", tmp_path / "repo"
    holder = Holder(out, "--output")
    try:
        result = cli("--model", "tiny", "--output", str(out), "-q")
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(f"bgevl-export: error: --output {out} is being written by another process "
                                        f"(pid {holder.proc.pid}); wait for it to finish or choose another --output")
        # a repository being written by another process: refused before the export starts, naming --triton-repo
        other = Holder(repo, "--output")
        try:
            result = cli("--model", "tiny", "--output", str(tmp_path / "second"), "--triton-repo", str(repo), "-q")
            assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
            assert f"--triton-repo {repo} is being written by another process (pid {other.proc.pid})" in result.stderr
            assert not (tmp_path / "second").exists()
        finally:
            other.close()
    finally:
        holder.close()
    assert not out.exists() and not repo.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # lock files removed with their holders


def test_a_file_put_into_the_output_during_an_export_is_never_deleted(tmp_path):
    out = tmp_path / "out"

    def sink(message: str) -> None:
        if "exporting" in message:  # the export is under way: someone puts a file where it will go
            out.mkdir()
            (out / "notes.txt").write_text("mine")

    with pytest.raises(BgevlError, match=rf"--output {out} changed while this ran and now holds files it did not "
                                         rf"write; nothing there was replaced or deleted"):
        run_export(ExportOptions(output=out, model="tiny", precision="fp32", validate=False), sink=sink)
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial directory, no lock file


def test_a_repository_rechecks_its_output_and_names_the_flag_it_came_from(tmp_path, export_dir):
    repo = tmp_path / "repo"

    def sink(message: str) -> None:
        if message.startswith("writing Triton repository"):
            repo.mkdir()
            (repo / "README").write_text("mine")

    with pytest.raises(BgevlError, match=rf"^--triton-repo {repo} changed while this ran"):
        write_repository(export_dir("fp32"), repo, option="--triton-repo", sink=sink)
    assert (repo / "README").read_text() == "mine"
    # --overwrite keeps its meaning: a previous repository is replaced, anything else is not
    (repo / "README").unlink()
    write_repository(export_dir("fp32"), repo, sink=None)
    first = os.stat(repo / "bgevl" / "config.pbtxt").st_ino
    with pytest.raises(BgevlError, match="exists and is not empty; pass --overwrite"):
        write_repository(export_dir("fp32"), repo, sink=None)
    write_repository(export_dir("fp32"), repo, overwrite=True, sink=None)
    assert os.stat(repo / "bgevl" / "config.pbtxt").st_ino != first


def test_overwrite_of_an_earlier_export_never_deletes_the_users_own_files_in_it(tmp_path):
    """--overwrite over an earlier export deleted the user's files inside it (one written during the run too) and
    exited 0: now it replaces only what bgevl wrote, and refuses in one line while anything else is there."""
    out = tmp_path / "out"
    run_export(ExportOptions(output=out, model="tiny", precision="fp32", validate=False), sink=lambda m: None)
    (out / "processor" / "mine.json").write_text("{}")  # inside a folder the export owns: its to replace
    run_export(ExportOptions(output=out, model="tiny", precision="fp32", validate=False, overwrite=True),
               sink=lambda m: None)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    (out / "notes.txt").write_text("mine")
    (out / "eval").mkdir()
    (out / "eval" / "report.md").write_text("mine too")
    with pytest.raises(BgevlError, match=rf"^--output {out} holds a bgevl export \(manifest.json\) and files it did "
                                         rf"not write \(eval/report.md, notes.txt\); --overwrite replaces only what "
                                         rf"bgevl wrote, so nothing was deleted"):
        run_export(ExportOptions(output=out, model="tiny", precision="fp32", validate=False, overwrite=True),
                   sink=lambda m: None)
    assert (out / "notes.txt").read_text() == "mine" and (out / "eval" / "report.md").read_text() == "mine too"
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == sorted(before + ["notes.txt", "eval",
                                                                                         "eval/report.md"])

    (out / "notes.txt").unlink()
    (out / "eval" / "report.md").unlink()
    (out / "eval").rmdir()

    def sink(message: str) -> None:
        if "exporting" in message:  # during the run, the user writes into the export being replaced
            (out / "late.txt").write_text("mine")

    with pytest.raises(BgevlError, match="changed while this ran and now holds files it did not write"):
        run_export(ExportOptions(output=out, model="tiny", precision="fp32", validate=False, overwrite=True), sink=sink)
    assert (out / "late.txt").read_text() == "mine"
