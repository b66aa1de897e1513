"""How the command-line tools end when asked to: SIGTERM (``docker stop``, a CI cancel, ``kill``) and
SIGHUP (a closed terminal) are handled like Ctrl-C, so that every ``finally`` and context manager runs
(staging directories, temporary folders, servers and child processes go), and the tool prints one line
instead of a traceback; a closed stdout (``| head``) ends the tool quietly."""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable


def interrupt_on_signals() -> None:
    """SIGTERM and SIGHUP raise ``KeyboardInterrupt`` in the main thread, and SIGINT does too even when the
    tool was started with it ignored (``cmd &`` in a non-interactive shell)."""
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGHUP, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def run_cli(tool: str, body: Callable[[], int], interrupted: str = "interrupted") -> int:
    """``body()`` with the signals above handled: an interrupt prints ``<tool>: <interrupted>`` and returns
    130; a closed stdout returns 141 (what a shell reports for SIGPIPE) without a traceback."""
    interrupt_on_signals()
    try:
        return body()
    except KeyboardInterrupt:
        print(f"{tool}: {interrupted}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away: point stdout at /dev/null so the interpreter's final flush does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
