"""How the command-line tools end when asked to: SIGTERM (``docker stop``, a CI cancel, ``kill``) and
SIGHUP (a closed terminal) are handled like Ctrl-C, so that every ``finally`` and context manager runs
(staging directories, temporary folders, servers and child processes go), and the tool prints one line
instead of a traceback; a closed stdout (``| head``) ends the tool quietly."""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Callable


#: set by a signal handled here: an interrupt raised where Python drops exceptions (inside a finalizer,
#: ``__del__``, during garbage collection; seen in a test run) would otherwise be lost and the tool run on
_interrupted = threading.Event()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _interrupted.set()
    raise KeyboardInterrupt


def _unraisable(report: sys.UnraisableHookArgs) -> None:
    """Python's report of an exception it dropped ("Exception ignored in ..."): not for the interrupt, which is
    handled (the run ends at its next progress line); everything else as Python reports it."""
    if isinstance(report.exc_value, KeyboardInterrupt) and _interrupted.is_set():
        return
    sys.__unraisablehook__(report)


def _forget_interrupts_seen_in_embedded_code() -> None:
    """An interrupt raised while a C extension ran code through ``PyRun_String`` (Cython modules do, when
    imported: an export imports lazily) sets CPython 3.11's ``_Py_UnhandledKeyboardInterrupt`` even though
    the exception is then caught here, and the interpreter ends by killing itself with SIGINT instead of
    returning the tool's code (exit -2 instead of 130, seen in CI). Once the interrupt is handled, the flag
    is cleared. Python 3.12 keeps it in the runtime state instead, and has no such symbol: nothing to do."""
    import ctypes

    try:
        ctypes.c_int.in_dll(ctypes.pythonapi, "_Py_UnhandledKeyboardInterrupt").value = 0
    except ValueError:  # not this interpreter's symbol
        pass


def interrupt_on_signals() -> None:
    """SIGTERM and SIGHUP raise ``KeyboardInterrupt`` in the main thread, and SIGINT does too even when the
    tool was started with it ignored (``cmd &`` in a non-interactive shell)."""
    if threading.current_thread() is not threading.main_thread():
        return
    _interrupted.clear()
    sys.unraisablehook = _unraisable
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, _on_signal)


def raise_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` if a signal came and its exception was swallowed; long-running tools call
    this at each progress line, so such an interrupt ends the run at the next one."""
    if _interrupted.is_set():
        raise KeyboardInterrupt


def run_cli(tool: str, body: Callable[[], int], interrupted: str | None = "interrupted", *,
            os_errors: str | None = None) -> int:
    """Every command line's one error path: ``body()`` with the signals above handled. A
    :class:`~bgevl.core.errors.BgevlError` prints ``<tool>: error: <message>`` and returns 2; an interrupt
    prints ``<tool>: <interrupted>`` and returns 130; a closed stdout returns 141 (what a shell reports for
    SIGPIPE); with ``os_errors`` (what was kept, e.g. "nothing was written"), an ``OSError`` (a full disk, a
    folder that became unwritable) is one line too, returning 2. No traceback in any of these. The signal
    handlers in place before are put back (a test may call a tool's ``main`` in its own process).
    ``interrupted=None``: an interrupt is how the tool is stopped (a server); ``body`` handles it and returns
    its own code."""
    from bgevl.core.errors import BgevlError

    main_thread = threading.current_thread() is threading.main_thread()
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)} \
        if main_thread else {}
    interrupt_on_signals()
    try:
        code = body()
        if interrupted is not None:
            raise_if_interrupted()  # a signal whose exception was lost: still the run of an interrupted tool
        return code
    except BgevlError as exc:
        print(f"{tool}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{tool}: {interrupted}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away: point stdout at /dev/null so the interpreter's final flush does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        if os_errors is None:
            raise
        print(f"{tool}: error: {exc.strerror or exc}: {exc.filename or ''}; {os_errors}", file=sys.stderr)
        return 2
    finally:
        if _interrupted.is_set():
            _forget_interrupts_seen_in_embedded_code()
        for signum, handler in previous.items():
            if handler is not None:
                signal.signal(signum, handler)
