"""``bgevl-serve``: serve a model repository with the local CPU Triton server (:mod:`bgevl.serving.server`)
and the embeddings API (:mod:`bgevl.api`) in front of it."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bgevl.core.errors import BgevlError
from bgevl.core.interrupts import run_cli
from bgevl.serving.server import ADMIN_HEADER, DEFAULT_HOST, RESTRICTED_APIS, TritonServer, _port_in_use


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bgevl-serve", description=(
        "Serve a Triton model repository written by bgevl-export with the CPU tritonserver bundled in the "
        "nvidia-pytriton wheel. Ctrl-C stops it."), formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("repository", type=Path, help="model repository (bgevl-export --triton-repo DIR)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--log-file", type=Path, default=None, help="server log (default: a temporary file, printed at start)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the models to load")
    p.add_argument("--verbose", action="store_true", help="Triton's verbose log")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help="address HTTP, gRPC and metrics listen on; 0.0.0.0 exposes them to every network the machine is on")
    p.add_argument("--admin-key", default=None,
                   help=f"value of the {ADMIN_HEADER!r} header that unlocks the restricted APIs ({', '.join(RESTRICTED_APIS)}); "
                        f"default: a random key printed at start")
    p.add_argument("--unrestricted-apis", action="store_true",
                   help="do not restrict those APIs (any client that reaches the port may use them)")
    p.add_argument("--no-api", action="store_true",
                   help="do not start the embeddings API (OpenAI's /v1/embeddings, bgevl-api) in front of the server")
    p.add_argument("--api-model", default=None, help="the entry model the API forwards to (the repository's --triton-name; "
                                                     "None: bgevl)")
    try:
        from bgevl.api.cli import add_api_options
    except ImportError:  # the api extra is not installed: bgevl-serve serves Triton alone
        return p
    add_api_options(p, prefix="api-")
    return p


def start_api(server: TritonServer, args: argparse.Namespace):
    """The embeddings API in a thread of this process, forwarding to ``server`` over gRPC (asyncio client)."""
    try:
        from bgevl.api.backends import TritonBackend
        from bgevl.api.cli import ApiServer, api_options
    except ImportError as exc:
        raise BgevlError(f"the embeddings API needs the api extra ({exc.name} is missing): pip install "
                         f"'bgevl-export[api]', or pass --no-api") from None
    from bgevl.core.specs import DEFAULT_SERVING_NAME

    model = args.api_model or DEFAULT_SERVING_NAME
    if model not in server.models:
        raise BgevlError(f"--api-model {model!r}: the repository has no such model ({', '.join(server.models)}); pass "
                         f"the entry model's name (bgevl-export --triton-name) or --no-api")
    processor = server.repository / f"{model}_preprocess" / "1" / "processor"
    backend = TritonBackend(server.grpc_url, model=model, name=args.model_name, timeout_s=args.api_timeout,
                            tokenizer_dir=processor if processor.is_dir() else None)
    api = ApiServer(backend, api_options(args), host=args.api_host or args.host, port=args.api_port)
    api.start()
    api.wait_ready(60)
    return api


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM (docker stop, kill), SIGHUP (a closed terminal) and Ctrl-C stop the server: exit 0
    return run_cli("bgevl-serve", lambda: _serve(args), interrupted=None)


def _serve(args: argparse.Namespace) -> int:
    server = api = None
    try:
        if not args.no_api and hasattr(args, "api_port") and _port_in_use(args.api_port):
            raise BgevlError(f"port {args.api_port} is in use; pass another --api-port, or --no-api")
        server = TritonServer(args.repository, http_port=args.http_port, grpc_port=args.grpc_port,
                              metrics_port=args.metrics_port, log_file=args.log_file, verbose=args.verbose,
                              host=args.host, admin_key=args.admin_key, restrict_apis=not args.unrestricted_apis)
        print(f"starting tritonserver for {server.repository}", flush=True)
        server.start(args.timeout, progress=lambda msg: print(msg, flush=True))
        assert server.process is not None  # start() launched it
        print(f"tritonserver pid {server.process.pid}, log {server.log_file}", flush=True)
        print(f"ready: {len(server.models)} models ({', '.join(server.models)})", flush=True)
        print(f"  HTTP     {server.http_url}\n  gRPC     {server.grpc_url}\n  metrics  {server.metrics_url}"
              f"  (listening on {server.host})", flush=True)
        if server.restrict_apis:
            where = "the --admin-key value"
            if args.admin_key is None:  # a generated key goes to a file only its owner reads, not to the log
                key_file = server._workdir / "admin-key"
                key_file.touch(mode=0o600)
                key_file.write_text(server.admin_key + "\n")
                where = f"the key in {key_file}"
            print(f"restricted APIs ({', '.join(RESTRICTED_APIS)}) need the header '{ADMIN_HEADER}: <key>' with {where}",
                  flush=True)
        if not args.no_api:
            api = start_api(server, args)
            print(f"  API      {api.url}/v1/embeddings  (OpenAI's embeddings API: what clients use; model "
                  f"{api.backend.name!r}, OpenAPI page {api.url}/docs{', API key required' if api.app.state.options.api_key else ''})",
                  flush=True)
        print("Ctrl-C to stop", flush=True)
        while server.alive():
            time.sleep(0.5)
            server.recover_dead_stubs(report=lambda msg: print(msg, flush=True))
            if server.unrecoverable:
                print(f"bgevl-serve: error: model(s) {', '.join(server.unrecoverable)} cannot serve (reloads failed "
                      f"{server.RELOAD_ATTEMPTS} times, or its stubs died more often within "
                      f"{server.RECOVERY_WINDOW_S:.0f} s); stopping the server so that a supervisor restarts it",
                      file=sys.stderr, flush=True)
                server.stop(server.STOP_GRACE_S)  # a load hung on a dead stub does not hold the exit
                return 3
        print(f"bgevl-serve: tritonserver exited unexpectedly (code {server.process.returncode}):\n{server.log_tail()}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if api is not None:
            print("stopping the embeddings API (finishing requests in flight) ...", flush=True)
            api.stop()
            api = None
        if server is not None and server.process is not None:
            print("stopping tritonserver ...", flush=True)
            code = server.stop()
            print(f"stopped (exit code {code})", flush=True)
        return 0
    finally:
        if api is not None:
            api.stop()
        if server is not None and server.process is not None:
            server.stop()  # also after an unexpected exit: its stubs and temporary directory


if __name__ == "__main__":
    sys.exit(main())
