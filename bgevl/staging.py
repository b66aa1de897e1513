"""Directories that appear complete or not at all (exports, engine sets, Triton repositories)."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def staged_directory(final: Path) -> Iterator[Path]:
    """Yield a fresh ``.<name>.partial-*`` directory beside ``final``; when the block succeeds it
    replaces ``final``, when anything fails (Ctrl-C included) it is removed and ``final`` is untouched."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield staging
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
