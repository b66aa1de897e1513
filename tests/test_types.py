"""The type checker, as CI runs it: mypy with the project's configuration (``[tool.mypy]`` in
``pyproject.toml``: strict on ``bgevl.core`` and ``bgevl.families``, whose protocol plug-ins implement;
mypy's defaults on the rest). A type error anywhere in the package fails the suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_the_package_type_checks():
    pytest.importorskip("mypy", reason="mypy is not installed (pip install 'bgevl-export[test]')")
    done = subprocess.run([sys.executable, "-m", "mypy", "bgevl"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].startswith("Success: no issues found")
