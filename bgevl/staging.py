"""Directories that appear complete or not at all (exports, engine sets, Triton repositories)."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from bgevl.errors import BgevlError


def _umask() -> int:
    """The process umask, read without setting it (os.umask would change it for every thread meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_replaceable(final: Path, overwrite: bool, is_ours: Callable[[Path], bool], what: str, option: str) -> None:
    """Refuse to write over a non-empty ``final`` unless ``overwrite`` and it holds ``what`` (``is_ours``):
    ``--overwrite`` must never delete a directory of someone else's files."""
    if final.exists() and not final.is_dir():
        raise BgevlError(f"{option} {final} is a file; pass a directory path")
    if not final.is_dir() or not any(final.iterdir()):
        return
    if not overwrite:
        raise BgevlError(f"{option} {final} exists and is not empty; pass --overwrite to replace it or choose another directory")
    if not is_ours(final):
        raise BgevlError(f"{option} {final} is not empty and does not hold {what}; --overwrite replaces only {what} "
                         f"or an empty directory, so nothing was deleted: choose another {option}")


@contextmanager
def staged_directory(final: Path) -> Iterator[Path]:
    """Yield a fresh ``.<name>.partial-*`` directory beside ``final``; when the block succeeds it
    replaces ``final``, when anything fails (Ctrl-C and SIGTERM included) it is removed and ``final``
    is untouched. The result gets the user's umask (``mkdtemp`` makes 0700, which a server running as
    another user, e.g. in a Triton container, could not read)."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    except OSError as exc:
        raise BgevlError(f"cannot write {final}: {exc.strerror or exc} ({exc.filename or final.parent}); "
                         f"choose a writable output directory") from None
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_umask())
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
