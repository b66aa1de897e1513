"""Directories that appear complete or not at all (exports, engine sets, Triton repositories)."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from bgevl.core.errors import BgevlError


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


def check_replaceable(final: Path, overwrite: bool, is_ours: Callable[[Path], bool], what: str, option: str,
                      foreign: Callable[[Path], list[str]] | None = None) -> None:
    """Refuse to write over a non-empty ``final`` unless ``overwrite`` and it holds ``what`` (``is_ours``):
    ``--overwrite`` must never delete a directory of someone else's files, nor a file of someone else's that
    was put into one of ours (``foreign``: the files in ``final`` that ``what`` did not write)."""
    if final.exists() and not final.is_dir():
        raise BgevlError(f"{option} {final} is a file; pass a directory path")
    if not final.is_dir() or not any(final.iterdir()):
        return
    if not overwrite:
        raise BgevlError(f"{option} {final} exists and is not empty; pass --overwrite to replace it or choose another directory")
    if not is_ours(final):
        raise BgevlError(f"{option} {final} is not empty and does not hold {what}; --overwrite replaces only {what} "
                         f"or an empty directory, so nothing was deleted: choose another {option}")
    others = foreign(final) if foreign is not None else []
    if others:
        listed = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise BgevlError(f"{option} {final} holds {what} and files it did not write ({listed}); --overwrite replaces "
                         f"only what bgevl wrote, so nothing was deleted: move those files away or choose another {option}")


#: Outputs this process holds the lock of, with how often (a driver locks what its steps lock again).
_held: dict[Path, int] = {}
_held_guard = threading.Lock()


def _resolved(path: str | os.PathLike[str]) -> Path:
    return Path(path).expanduser().resolve()


@contextmanager
def output_lock(final: str | os.PathLike[str], option: str) -> Iterator[None]:
    """Hold an exclusive lock on the output ``final`` (``fcntl.flock`` on ``.<name>.lock`` beside it) for the
    block: a second writer of the same path, in this process or another, is refused in one line naming
    ``option`` (the flag that named the path), instead of both running and the last silently replacing
    the first. Re-entrant within the process. The lock file is removed at the end; a writer that opened
    it just before is noticed (the inode changed) and tries again on the new file."""
    final = _resolved(final)
    with _held_guard:
        if final in _held:
            _held[final] += 1
            acquired = False
        else:
            acquired = True
    if not acquired:
        try:
            yield
        finally:
            with _held_guard:
                _held[final] -= 1
        return
    lock_path = final.parent / f".{final.name}.lock"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise BgevlError(f"{option} {final} is being written by another process (pid {holder}); wait for it to "
                                 f"finish or choose another {option}") from None
            try:
                if os.fstat(fd).st_ino == os.stat(lock_path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # the previous holder removed the file between our open and our lock
    except OSError as exc:
        raise BgevlError(f"cannot write {final}: {exc.strerror or exc} ({exc.filename or final.parent}); "
                         f"choose a writable {option}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    with _held_guard:
        _held[final] = 1
    try:
        yield
    finally:
        with _held_guard:
            del _held[final]
        try:
            os.unlink(lock_path)
        except OSError:
            pass
        os.close(fd)


@contextmanager
def staged_directory(final: Path, *, option: str = "--output", overwrite: bool = False,
                     is_ours: Callable[[Path], bool] | None = None, what: str = "",
                     foreign: Callable[[Path], list[str]] | None = None) -> Iterator[Path]:
    """Yield a fresh ``.<name>.partial-*`` directory beside ``final``; when the block succeeds it
    replaces ``final``, when anything fails (Ctrl-C and SIGTERM included) it is removed and ``final``
    is untouched. The result gets the user's umask (``mkdtemp`` makes 0700, which a server running as
    another user, e.g. in a Triton container, could not read).

    The output is locked for the whole block (:func:`output_lock`). With ``is_ours``, what may be replaced
    is checked (:func:`check_replaceable`) when the block starts and again just before the rename, so a
    file someone put into ``final`` meanwhile is never deleted: the run is refused instead."""
    final = _resolved(final)
    with output_lock(final, option):
        if is_ours is not None:
            check_replaceable(final, overwrite, is_ours, what, option, foreign)
        try:
            staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
        except OSError as exc:
            raise BgevlError(f"cannot write {final}: {exc.strerror or exc} ({exc.filename or final.parent}); "
                             f"choose a writable output directory") from None
        try:
            yield staging
            os.chmod(staging, 0o777 & ~_umask())
            if is_ours is not None:
                try:
                    check_replaceable(final, overwrite, is_ours, what, option, foreign)
                except BgevlError:
                    raise BgevlError(f"{option} {final} changed while this ran and now holds files it did not write; "
                                     f"nothing there was replaced or deleted: move them away and run again, or choose "
                                     f"another {option}") from None
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
