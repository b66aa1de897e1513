"""Dead python-backend stubs, seen from the process table; and the pod's health probe built on them.

Triton 2.51 does not notice that a python-backend stub died (the OOM killer, kill -9): it keeps the
model, the models calling it and the server live and ready, and answers the requests it gives the dead
instance with "Stub process ... is not healthy", for as long as the process runs. Its
``/v2/health/live`` and ``/v2/health/ready`` cannot see it, so:

* ``bgevl-serve`` (:meth:`bgevl.serving.server.TritonServer.recover_dead_stubs`) compares the stubs of
  its server with those of its last check and reloads the model of a dead one;
* in a cluster, where the pod runs tritonserver directly and nothing reloads a model (the admin APIs
  are off), the container's liveness and readiness probes are ``python3 -m bgevl.serving.probe``
  (an exec probe, :func:`main`): the same comparison between one probe and the next, the previous
  stubs kept in a small state file (``/tmp``, the pod's emptyDir). A stub that went while Triton still
  calls its model ready died; the probe then fails, and keeps failing until the server is restarted
  (the state names the server process by pid and start time, so a restarted container starts afresh),
  so the kubelet restarts the container after the probe's ``failureThreshold``. ``--ready`` also
  requires Triton's ``/v2/health/ready``, so a pod with a dead stub leaves the Service at once.

Only the standard library: the probe runs every few seconds in the serving image.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

STUB = "triton_python_backend_stub"
SERVER = "tritonserver"
DEFAULT_STATE = "/tmp/bgevl-probe.json"


def _processes() -> dict[int, tuple[int, list[str], str]]:
    """{pid: (parent pid, argv, start time in clock ticks)} of every process /proc shows."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ...; field 22 is starttime
        if fields[0] == "Z":  # a zombie is dead
            continue
        out[int(entry)] = (int(fields[1]), [a.decode(errors="replace") for a in argv if a], fields[19])
    return out


def stub_processes(server_pid: int, processes: dict | None = None) -> dict[int, str]:
    """{pid: model name} of the python-backend stubs below ``server_pid`` (their argv[1] is
    ``<repository>/<model>/<version>/model.py``)."""
    processes = _processes() if processes is None else processes
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in processes.items():
        children.setdefault(parent, []).append(pid)
    out, todo = {}, list(children.get(server_pid, []))
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        argv = processes[pid][1]
        if argv and argv[0].endswith(STUB) and len(argv) > 1:
            out[pid] = Path(argv[1]).parent.parent.name
    return out


def dead_stubs(previous: dict[int, str], current: dict[int, str], still_ready: Callable[[str], bool]) -> dict[str, int]:
    """{model: pid} of stubs in ``previous`` that are gone from ``current`` while Triton still calls their
    model ready (one whose model was unloaded or reloaded on purpose went with it)."""
    dead: dict[str, int] = {}
    for pid, model in previous.items():
        if pid not in current and model not in dead and still_ready(model):
            dead[model] = pid
    return dead


def _status(url: str) -> int:
    """HTTP status of a GET (urllib, not tritonclient: the probe runs in the serving image, whose requirements
    are the runtime's, without the serving extra)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return 0


def find_server(processes: dict) -> tuple[int, str] | None:
    """(pid, start time) of the tritonserver process (the container's, one per pod)."""
    found = [(pid, start) for pid, (_, argv, start) in processes.items() if argv and Path(argv[0]).name == SERVER]
    return min(found) if found else None


def check(url: str, state_file: Path, ready: bool, pid: int | None = None) -> tuple[bool, str]:
    """One probe: (passed, the line to print). See the module docstring. ``pid``: the server's (default:
    the tritonserver process found)."""
    processes = _processes()
    if pid is not None:
        server = (pid, processes[pid][2]) if pid in processes else None
    else:
        server = find_server(processes)
    if server is None:
        return False, f"no {SERVER} process" + (f" {pid}" if pid is not None else "")
    if _status(f"{url}/v2/health/live") != 200:
        return False, f"{SERVER} is not live ({url}/v2/health/live)"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        state = {}
    if state.get("server") != list(server):  # another server (a restarted container): start afresh
        state = {"server": list(server), "stubs": {}, "dead": {}}
    previous = {int(pid): model for pid, model in state["stubs"].items()}
    current = stub_processes(server[0], processes)
    dead = dead_stubs(previous, current, lambda model: _status(f"{url}/v2/models/{model}/ready") == 200)
    state["dead"].update({model: pid for model, pid in dead.items()})
    state["stubs"] = {str(pid): model for pid, model in current.items()}
    tmp = state_file.with_name(f".{state_file.name}.{os.getpid()}")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, state_file)  # probes may overlap (liveness and readiness): each write is whole
    if state["dead"]:
        listed = ", ".join(f"{model} (pid {pid})" for model, pid in sorted(state["dead"].items()))
        return False, (f"python-backend stub(s) of {listed} died; Triton does not recover them and fails their "
                       f"requests: restart the container")
    if ready and _status(f"{url}/v2/health/ready") != 200:
        return False, f"{SERVER} is not ready ({url}/v2/health/ready)"
    return True, f"{'ready' if ready else 'live'}: {len(current)} python-backend stubs"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bgevl.serving.probe", description=(
        "Kubernetes exec probe of a tritonserver container: fails when Triton is not live, or when a "
        "python-backend stub has died since an earlier probe (Triton's own health endpoints do not see it)."))
    p.add_argument("--url", default="http://localhost:8000", help="Triton's HTTP endpoint")
    p.add_argument("--state", type=Path, default=Path(DEFAULT_STATE), help="where the stubs seen are kept between probes")
    p.add_argument("--ready", action="store_true", help="readiness: also require Triton's /v2/health/ready")
    p.add_argument("--pid", type=int, default=None, help="the tritonserver process (default: the one found)")
    args = p.parse_args(argv)
    passed, line = check(args.url.rstrip("/"), args.state, args.ready, args.pid)
    print(line)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
