"""A local Triton server on a CPU machine: the ``tritonserver`` bundled in the ``nvidia-pytriton`` wheel.

``bgevl-serve REPO`` (or :class:`TritonServer` as a context manager in tests and benchmarks):

* builds a backend directory with the wheel's python backend (``libtriton_python.so``,
  ``triton_python_backend_utils.py`` and the stub for this Python version);
* starts the server with ``LD_LIBRARY_PATH`` at the wheel's libraries and this environment's
  ``bin`` first on ``PATH``: the python-backend stub starts its embedded interpreter isolated and
  resolves ``python3`` on ``PATH``, so that environment's site-packages (numpy<2, onnxruntime,
  transformers, bgevl) are what the models import, without PYTHONPATH (which the stub ignores);
* waits until every model is ready, checking that the process it started is still alive (a
  second server on a busy port exits while the first one answers the readiness poll);
* stops with SIGINT (Triton's graceful shutdown), then kills the whole process group (server and
  stubs) if it has not exited in time, so nothing is left running.

What it relies on, as observed with the ``nvidia-pytriton`` 0.7.0 wheel (tritonserver 2.51.0): the
server runs with ``LD_LIBRARY_PATH`` at ``nvidia_pytriton.libs`` and a ``--backend-directory`` whose
``python/`` holds ``libtriton_python.so``, ``triton_python_backend_utils.py`` and the stub of the running
Python; the 3.11 stub links Debian's ``libpython3.11.so`` and starts isolated (``PYTHONPATH`` is not on its
``sys.path``); NVML/DCGM warnings at start are harmless on a CPU machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from bgevl.core.errors import BgevlError

#: Backends the bundled server has: the python backend only (no onnxruntime, tensorrt, pytorch).
BUNDLED_BACKENDS = {"python", "ensemble"}

#: Triton APIs restricted by default: a client that reaches the port could otherwise register a
#: /dev/shm region by name and have the server write into it, load or unload models, or change
#: logging and tracing. They need the header ``bgevl-admin: <key>`` (``--admin-key``).
RESTRICTED_APIS = ("shared-memory", "model-repository", "logging", "trace")
ADMIN_HEADER = "bgevl-admin"

#: Loopback unless --host says otherwise.
DEFAULT_HOST = "127.0.0.1"


def _prctl():
    """libc's prctl, resolved in the parent: the child between fork and exec must not dlopen (the
    parent may have other threads, e.g. bgevl-bench's memory sampler, holding the loader's lock)."""
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()
PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int):
    """``preexec_fn`` of the server: its own session, SIGTERM (Triton's graceful shutdown, which also
    ends the stubs and frees their /dev/shm regions) when the thread that started it dies, and an
    immediate exit if that parent is already gone. SIGINT back to default, in case it was inherited
    ignored. ``TritonServer.start`` must therefore be called from a thread that outlives the server
    (the main thread, in bgevl-serve and bgevl-bench)."""

    def setup() -> None:
        os.setsid()
        if _PRCTL is not None:
            _PRCTL(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # the launcher died between fork and prctl
            os._exit(1)
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    return setup


def stub_libpython(paths: dict[str, Path]) -> Path | None:
    """The libpython the python-backend stub loads (``ldd``), or None if it cannot be told."""
    try:
        out = subprocess.run(["ldd", str(paths["stub"])], capture_output=True, text=True, timeout=30,
                             env={**os.environ, "LD_LIBRARY_PATH": str(paths["libs"])}).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if "libpython" in line and "=>" in line:
            target = line.split("=>")[1].split("(")[0].strip()
            return Path(target).resolve() if target and target != "not found" else None
    return None


def check_interpreter(libpython: Path | None, base_prefix: str = sys.base_prefix) -> None:
    """The stub embeds one libpython and activates this environment's site-packages: the environment
    must be built on that same Python, or the two standard libraries mix and the models fail to load
    (measured: a venv of pyenv's 3.11.7 beside Debian's 3.11.2 libpython fails inside multiprocessing)."""
    if libpython is None:
        raise BgevlError("the python-backend stub's libpython was not found (ldd); install the Python shared library "
                         "it needs (Debian: libpython3.11) and create the environment with that Python")
    base = Path(base_prefix).resolve()
    if not str(libpython).startswith(str(base) + os.sep):
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        raise BgevlError(
            f"this environment is built on the Python in {base}, but the Triton python-backend stub embeds {libpython}; "
            f"the models would load the wrong standard library. Create the environment with that Python, e.g. "
            f"`/usr/bin/python{version} -m venv .venv` (scripts/setup-env.sh does), and run bgevl-serve from it")


def pytriton_paths() -> dict[str, Path]:
    """Locations inside the installed nvidia-pytriton wheel."""
    try:
        import pytriton
    except ImportError as exc:
        raise BgevlError("the local Triton server comes from the nvidia-pytriton wheel: "
                         "pip install 'bgevl-export[serving]'") from exc
    root = Path(pytriton.__file__).resolve().parent / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    paths = {
        "server": root / "bin" / "tritonserver",
        "libs": Path(pytriton.__file__).resolve().parent.parent / "nvidia_pytriton.libs",
        "backend": root / "backends" / "python",
        "stub": root / "python_backend_stubs" / version / "triton_python_backend_stub",
    }
    if not paths["stub"].is_file():
        raise BgevlError(f"nvidia-pytriton has no python-backend stub for Python {version} "
                         f"({paths['stub'].parent.parent} lists the supported versions); use one of those Pythons")
    for key in ("server", "libs", "backend"):
        if not paths[key].exists():
            raise BgevlError(f"the nvidia-pytriton install is incomplete: {paths[key]} is missing; reinstall it")
    return paths


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on the loopback now: all bound at once before any is released (ports
    taken one after the other may repeat: a server given the same port for HTTP and metrics exits at start,
    seen in a test run)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def check_servable(repository: Path) -> list[str]:
    """Model names of the repository; refuses backends the bundled server lacks."""
    from bgevl.serving.repository import repository_backends

    backends = repository_backends(repository)
    if not backends:
        raise BgevlError(f"{repository} holds no model (no <model>/config.pbtxt); write one with "
                         f"`bgevl-export --triton-repo DIR` or `bgevl-export triton-repo EXPORT_DIR --output DIR`")
    missing = {name: b for name, b in backends.items() if b not in BUNDLED_BACKENDS}
    if missing:
        listed = ", ".join(f"{n} ({b})" for n, b in sorted(missing.items()))
        raise BgevlError(
            f"the CPU Triton server bundled in nvidia-pytriton has only the python backend, and {listed} need(s) "
            f"another. Package the export with --triton-backend python for this server, or serve this repository "
            f"with a full Triton (e.g. the nvcr.io/nvidia/tritonserver container)")
    return sorted(backends)


WORKDIR_PREFIX = "bgevl-triton-"


def remove_stale_workdirs() -> None:
    """Temporary directories of servers whose launcher was killed (SIGKILL runs no clean-up): removed
    at the next start, when the process that made them is gone."""
    for directory in Path(tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*"):
        try:
            owner = int((directory / "owner.pid").read_text())
            os.kill(owner, 0)
        except ProcessLookupError:
            shutil.rmtree(directory, ignore_errors=True)
        except (OSError, ValueError):
            continue  # not ours to judge (no pid file, another user's)


class TritonServer:
    """The bundled ``tritonserver`` serving one repository; a context manager."""

    def __init__(self, repository: str | os.PathLike, *, http_port: int | None = 8000, grpc_port: int | None = 8001,
                 metrics_port: int | None = 8002, log_file: str | os.PathLike | None = None, verbose: bool = False,
                 host: str = DEFAULT_HOST, admin_key: str | None = None, restrict_apis: bool = True,
                 repository_uri: str | None = None, env: dict[str, str] | None = None):
        """``repository``: a local repository, checked here; ``repository_uri``: where the server reads
        it from instead (``s3://host:port/bucket/path``, ``gs://...``), a copy of ``repository``;
        ``env``: extra environment for the server (object-store credentials)."""
        import re
        import secrets

        if admin_key is not None and not re.fullmatch(r"[A-Za-z0-9_-]{8,}", admin_key):
            raise BgevlError("--admin-key: use at least 8 letters, digits, '-' or '_' (Triton's rule syntax takes no "
                             "':', ',' or '=')")
        self.repository = Path(repository).expanduser().resolve()
        self.repository_uri = repository_uri or str(self.repository)
        self.extra_env = dict(env or {})
        spare = iter(free_ports(3))  # distinct ones for the ports not given
        self.http_port = http_port or next(spare)
        self.grpc_port = grpc_port or next(spare)
        self.metrics_port = metrics_port or next(spare)
        self.verbose = verbose
        self.host = host
        self.restrict_apis = restrict_apis
        self.admin_key = admin_key or secrets.token_urlsafe(16)
        self.models = check_servable(self.repository)
        remove_stale_workdirs()
        self._workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
        (self._workdir / "owner.pid").write_text(str(os.getpid()))
        self.log_file = Path(log_file) if log_file else self._workdir / "tritonserver.log"
        self.process: subprocess.Popen | None = None
        self._stubs: dict[int, str] = {}
        #: models whose stub died and that did not come back after RELOAD_ATTEMPTS reloads
        self.unrecoverable: list[str] = []
        self._deaths: dict[str, list[float]] = {}  # model -> when its stubs died (monotonic), for RECOVERY_WINDOW_S
        #: model -> the models it calls (the reload of a model takes its callers along)
        from bgevl.serving.repository import model_dependencies

        self.dependencies = model_dependencies(self.repository)
        self._generation = 0

    @property
    def _client_host(self) -> str:
        return "localhost" if self.host in ("127.0.0.1", "0.0.0.0", "::", "localhost") else self.host

    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    def _backend_dir(self, paths: dict[str, Path]) -> Path:
        backend = self._workdir / "backends" / "python"
        backend.mkdir(parents=True)
        for src in (paths["backend"] / "libtriton_python.so", paths["backend"] / "triton_python_backend_utils.py",
                    paths["stub"]):
            shutil.copy2(src, backend / src.name)  # copies: the backend finds the stub beside its own real path
        return backend.parent

    def command(self, backend_dir: Path, server: Path) -> list[str]:
        cmd = [str(server), f"--model-repository={self.repository_uri}", f"--backend-directory={backend_dir}",
               f"--http-address={self.host}", f"--grpc-address={self.host}", f"--metrics-address={self.host}",
               f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}", f"--metrics-port={self.metrics_port}",
               "--allow-metrics=true", "--exit-timeout-secs=10", f"--log-verbose={1 if self.verbose else 0}",
               # explicit control, everything loaded at start: a model whose stub died can be reloaded alone
               "--model-control-mode=explicit", "--load-model=*",
               # the configs are complete: no python stub started and ended only to auto-complete a config at each
               # load (one that ended right after a reload looked like a death to the stub watch)
               "--disable-auto-complete-config"]
        if self.restrict_apis:
            rule = f"{','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={self.admin_key}"
            cmd += [f"--http-restricted-api={rule}", f"--grpc-restricted-protocol={rule}"]  # the gRPC flag's 2.51 name
        return cmd

    def environment(self, libs: Path) -> dict[str, str]:
        env = dict(os.environ)
        env_bin = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([env_bin, env.get("PATH", "")])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
        env.pop("PYTHONPATH", None)  # ignored by the stub anyway; keep the server's view unambiguous
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 180.0, progress=None) -> "TritonServer":
        for port in (self.http_port, self.grpc_port, self.metrics_port):
            if _port_in_use(port):
                raise BgevlError(f"port {port} is in use (another Triton server?); stop it or pass other "
                                 f"--http-port/--grpc-port/--metrics-port")
        paths = pytriton_paths()
        check_interpreter(stub_libpython(paths))
        backend_dir = self._backend_dir(paths)
        log = open(self.log_file, "wb")
        self.process = subprocess.Popen(self.command(backend_dir, paths["server"]), stdout=log, stderr=subprocess.STDOUT,
                                        env=self.environment(paths["libs"]), preexec_fn=_die_with_parent(os.getpid()))
        log.close()
        try:
            self._wait_ready(timeout, progress)
        except BaseException:
            self.stop()
            raise
        self._stubs = self.stub_processes()
        return self

    # --- python-backend stubs: a dead one is found and its model reloaded ------------------------
    #
    # The python backend runs each model instance in a stub process. When one dies (the OOM killer,
    # kill -9), Triton 2.51 keeps reporting the model, its callers and the server ready, and answers
    # the requests it gives the dead instance with "Stub process ... is not healthy" (measured: for
    # minutes). The launcher watches the stubs (0.5 s in bgevl-serve) and, for a dead one:
    #
    # * when the model has no live instance left, it cannot serve: the models that call it (the BLS entry,
    #   an ensemble) are unloaded with it, so that Triton itself answers not ready for the model, every
    #   model that depends on it and the server (/v2/health/ready: Triton's strict readiness counts an
    #   unloaded model; the embeddings API asks for the entry model), then it and they are loaded again.
    #   Triton follows an ensemble's steps on its own, but not the calls of a BLS model (measured on 2.51:
    #   with bgevl_text unloaded, bgevl_composed went with it, the entry bgevl stayed ready);
    # * when a live instance is left (the preprocess model has two), the model still serves: it is
    #   reloaded in place, a load with its own configuration given again, for which Triton keeps the
    #   running model serving until the new one is ready (measured: no gap), and the entry model retries
    #   the requests that met the dead instance meanwhile (``backend_utils.call``), so the death fails at
    #   most the requests that were inside the dead stub.

    def stub_processes(self) -> dict[int, str]:
        """{pid: model name} of the server's python-backend stubs."""
        from bgevl.serving.probe import stub_processes

        return stub_processes(self.process.pid) if self.process is not None else {}

    def _client(self, timeout: float) -> Any:
        """tritonclient's HTTP client of this server (the serving extra installs it), for its control calls."""
        import tritonclient.http as http

        return http.InferenceServerClient(self.http_url, connection_timeout=timeout, network_timeout=timeout)

    def _control(self, action: str, model: str, timeout: float, config: str | None = None) -> tuple[int, str]:
        """``load`` or ``unload`` ``model`` through the repository API (restricted: the admin header); (HTTP status,
        Triton's message); status 0 when the server did not answer."""
        from tritonclient.utils import InferenceServerException

        client = self._client(timeout)
        try:
            if action == "load":
                client.load_model(model, headers={ADMIN_HEADER: self.admin_key}, config=config)
            else:
                client.unload_model(model, headers={ADMIN_HEADER: self.admin_key})
            return 200, ""
        except InferenceServerException as exc:
            status = str(exc.status() or "")
            return (int(status) if status.isdigit() else 0), exc.message() or str(exc)
        except (OSError, ConnectionError) as exc:
            return 0, str(exc)
        finally:
            client.close()

    #: Reload attempts for a model whose stub died, and the pause before the first retry (doubled each time).
    RELOAD_ATTEMPTS, RELOAD_BACKOFF_S = 3, 1.0
    #: A model whose stubs die more than RELOAD_ATTEMPTS times within this window (a replacement killed as soon
    #: as it appears, again and again), or that does not serve again within it, cannot serve: bgevl-serve stops
    #: the server (within STOP_GRACE_S) and exits, within 120 s of the first death in all. A load whose new stub
    #: is killed while it starts hangs in Triton 2.51 until its call times out (measured: 60 s), so each call of a
    #: recovery gets only the time left in its window.
    RECOVERY_WINDOW_S, STOP_GRACE_S = 90.0, 15.0

    def recover_dead_stubs(self, report=print, timeout: float = 60.0) -> list[str]:
        """One check: reload every model one of whose stubs has died since the last check (see above);
        returns the models reloaded. A reload that fails (its new stub died too, or the model no longer
        loads) is retried with backoff, :attr:`RELOAD_ATTEMPTS` times in all, within :attr:`RECOVERY_WINDOW_S`
        of the model's first death; a model that still cannot serve, or whose stubs keep dying, is added to
        :attr:`unrecoverable` (it and its callers stay unloaded: not ready), on which ``bgevl-serve`` stops the
        server and exits non-zero, so that a supervisor (systemd, Kubernetes) restarts it rather than leaving a
        server up that fails requests. The stubs a reload replaces are expected to exit and are not deaths (an
        in-place reload's old instances exit once the new ones serve: counted as deaths, they made the entry
        model reload every few seconds for ever); a stub of another model that dies during a reload is seen
        at the next check."""
        from bgevl.serving.probe import dead_stubs

        if not self.alive():
            return []
        current = self.stub_processes()
        # a stub that went while Triton still calls its model ready died; one whose model an admin
        # unloaded or reloaded through the repository API went on purpose
        dead = dead_stubs(self._stubs, current, self.ready)
        reloaded, retired = [], set()
        for model, pid in dead.items():
            now = time.monotonic()
            deaths = [t for t in self._deaths.get(model, []) if now - t < self.RECOVERY_WINDOW_S] + [now]
            self._deaths[model] = deaths
            if len(deaths) > self.RELOAD_ATTEMPTS:
                self.unrecoverable.append(model)
                report(f"bgevl-serve: a python-backend stub of model {model!r} (pid {pid}) died, its {len(deaths)}th "
                       f"death in {now - deaths[0]:.0f} s; not reloading it again")
                continue
            serving, replaced = self._recover(model, pid, current, deaths[0] + self.RECOVERY_WINDOW_S, report, timeout)
            retired |= replaced
            if serving:
                reloaded.append(model)
        if dead:
            after = self.stub_processes()
            missed = {p: m for p, m in current.items() if p not in after and p not in retired}  # seen next check
            current = {**{p: m for p, m in after.items() if p not in retired}, **missed}
        self._stubs = current
        return reloaded

    def _recover(self, model: str, pid: int, current: dict[int, str], deadline: float, report,
                 timeout: float) -> tuple[bool, set[int]]:
        """Reload ``model`` (in place where an instance of it is left), with its callers unloaded meanwhile
        otherwise; (whether it serves again, the pids the reload replaces)."""
        from bgevl.serving.repository import dependents

        start = time.monotonic()
        in_place = model in current.values()
        callers = [] if in_place else dependents(self.dependencies, model)
        replaced = {p for p, m in current.items() if m in (model, *callers)}

        def left() -> float:  # each call gets at most the time left before the deadline
            return min(timeout, max(1.0, deadline - time.monotonic()))

        if in_place:
            report(f"bgevl-serve: a python-backend stub of model {model!r} (pid {pid}) died; its other instances "
                   f"serve while it is reloaded in place")
        else:
            report(f"bgevl-serve: the python-backend stub of model {model!r} (pid {pid}) died; reloading {model}"
                   + (f" (not ready meanwhile, with the models that call it: {', '.join(callers)})" if callers else ""))
            for caller in reversed(callers):  # callers first: no request reaches them to fail on the model
                self._unload(caller, left())
        for attempt in range(1, self.RELOAD_ATTEMPTS + 1):
            budget = left()
            status, body = self._reload_in_place(model, budget) if in_place else self._reload(model, budget)
            for caller in callers:
                if status == 200:
                    status, body = self._control("load", caller, budget)
            if status == 200 and all(self.ready(m) for m in (model, *callers)):
                report(f"bgevl-serve: model {model!r} is serving again ({time.monotonic() - start:.1f} s)")
                return True, replaced
            why = f"HTTP {status}: {' '.join(body.split())[:300]}"
            pause = self.RELOAD_BACKOFF_S * 2 ** (attempt - 1)
            if attempt == self.RELOAD_ATTEMPTS or time.monotonic() + pause >= deadline:
                self.unrecoverable.append(model)
                report(f"bgevl-serve: reloading model {model!r} failed {attempt} times ({why})")
                break
            report(f"bgevl-serve: reloading model {model!r} failed ({why}); retrying in {pause:.0f} s")
            time.sleep(pause)
        return False, replaced

    def _unload(self, model: str, timeout: float) -> tuple[int, str]:
        """Unload ``model`` and wait until Triton no longer calls it ready."""
        status, body = self._control("unload", model, timeout)
        deadline = time.monotonic() + timeout
        while status == 200 and self.ready(model) and time.monotonic() < deadline:
            time.sleep(0.1)
        return status, body

    def _reload(self, model: str, timeout: float) -> tuple[int, str]:
        """Unload, then load ``model`` through the repository API (a load of a loaded model whose files did
        not change is a no-op in Triton 2.51, so the unload comes first)."""
        status, body = self._unload(model, timeout)
        if status == 200:
            status, body = self._control("load", model, timeout)
        return status, body

    def _reload_in_place(self, model: str, timeout: float) -> tuple[int, str]:
        """Load ``model`` again with its configuration given in the request (with a changed parameter, so that
        it is not a no-op): Triton loads new instances while the running ones serve, then swaps them."""
        import json

        from tritonclient.utils import InferenceServerException

        client = self._client(timeout)
        try:
            config = client.get_model_config(model)
        except (InferenceServerException, OSError, ConnectionError, ValueError) as exc:
            return 0, f"reading the configuration of {model!r}: {exc}"
        finally:
            client.close()
        self._generation += 1
        config.setdefault("parameters", {})["bgevl_reload"] = {"string_value": str(self._generation)}
        return self._control("load", model, timeout, config=json.dumps(config))

    def ready(self, model: str | None = None) -> bool:
        """Whether Triton calls ``model`` (None: the server) ready; False when it does not answer."""
        return self._asks(lambda client: client.is_model_ready(model) if model is not None else client.is_server_ready())

    def live(self) -> bool:
        """Whether Triton calls itself live (its health endpoint: a dead python-backend stub does not change it)."""
        return self._asks(lambda client: client.is_server_live())

    def _asks(self, question: Callable[[Any], Any]) -> bool:
        """One yes/no health question to the server; False when it does not answer."""
        client = self._client(2.0)
        try:
            return bool(question(client))
        except Exception:  # noqa: BLE001 - the client raises its own exception types, and socket errors
            return False
        finally:
            client.close()

    def _wait_ready(self, timeout: float, progress) -> None:
        assert self.process is not None  # start() launched it
        deadline, last = time.monotonic() + timeout, 0.0
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BgevlError(f"tritonserver exited with code {self.process.returncode} while loading "
                                 f"{self.repository}: {self.load_failures()} (server log: {self.log_file})")
            if self.ready() and all(self.ready(m) for m in self.models):
                return
            if progress and time.monotonic() - last > 5:
                progress(f"waiting for {len(self.models)} models to load ...")
                last = time.monotonic()
            time.sleep(0.2)
        raise BgevlError(f"tritonserver did not become ready within {timeout:.0f} s:\n{self.log_tail()}")

    def load_failures(self) -> str:
        """The models that failed to load and why, from the server log (Triton prints an option table
        and "failed to load all models" on the console; the cause is only in these lines)."""
        import re

        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return "no server log"
        found: dict[str, str] = {}
        for match in re.finditer(r"failed to load '([^']+)' version \d+: (.+?)(?:\"|$)", text, flags=re.M):
            found.setdefault(match.group(1), match.group(2).strip())
        if not found:
            return "no model load failure in the log; its last lines:\n" + self.log_tail(15)
        return "; ".join(f"model {name!r} failed to load: {why}" for name, why in found.items())

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        """Graceful SIGINT, then SIGKILL of the whole process group; returns the server's exit code."""
        if self.process is None:
            return None
        pgid = self.process.pid
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:  # stubs that outlived the server, or a server that ignored SIGINT
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        code = self.process.wait()
        deadline = time.monotonic() + 10
        while self.group_alive() and time.monotonic() < deadline:  # killed stubs take a moment to go
            time.sleep(0.05)
        shutil.rmtree(self._workdir / "backends", ignore_errors=True)
        if code == 0 or not self.log_file.is_relative_to(self._workdir):
            shutil.rmtree(self._workdir, ignore_errors=True)  # a failed server keeps its log for the user
        return code

    def group_alive(self) -> bool:
        """True while any process of the server's process group (server, stubs) exists."""
        if self.process is None:
            return False
        try:
            os.killpg(self.process.pid, 0)
            return True
        except ProcessLookupError:
            return False

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
