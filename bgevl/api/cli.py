"""``bgevl-api``: serve OpenAI's ``/v1/embeddings`` for an export directory (the runtime in this process)
or in front of a running Triton server (``--triton-url``). See docs/api.md."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from bgevl.api.app import ApiOptions, create_app
from bgevl.core.compact import RANGES_FILE, EmbeddingRanges
from bgevl.api.backends import EmbedderBackend, EmbeddingBackend, TritonBackend
from bgevl.api.images import FetchPolicy
from bgevl.core.errors import BgevlError
from bgevl.core.interrupts import run_cli
from bgevl.runtime.runners import BACKENDS

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
API_KEY_ENV = "BGEVL_API_KEY"


def uvicorn_config(app: Any, options: ApiOptions, **settings: Any) -> Any:
    """uvicorn's settings for the API: its HTTP/1.1 protocol with a deadline for a request's head and a bound
    on open connections (``bgevl.api.connections``), no access log."""
    import uvicorn

    from bgevl.api.connections import default_max_connections, guarded_protocol

    protocol = guarded_protocol(options.header_timeout_s, options.max_connections or default_max_connections())
    return uvicorn.Config(app, http=protocol, access_log=False, **settings)


class ApiServer:
    """uvicorn serving the API in a thread of this process (tests, ``bgevl-serve``, ``bgevl-bench``); ``stop``
    is uvicorn's graceful shutdown: no new connections, in-flight requests finish (up to ``grace_s``)."""

    def __init__(self, backend: EmbeddingBackend, options: ApiOptions = ApiOptions(), host: str = DEFAULT_HOST,
                 port: int = 0, grace_s: int = 30, log_level: str = "warning"):
        import uvicorn

        from bgevl.serving.server import free_port

        self.backend, self.host = backend, host
        self.port = port or free_port()
        self.app = create_app(backend, options)
        self.server = uvicorn.Server(uvicorn_config(self.app, options, host=host, port=self.port, log_level=log_level,
                                                    timeout_graceful_shutdown=grace_s))
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = "localhost" if self.host in ("127.0.0.1", "0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ApiServer":
        self.thread = threading.Thread(target=self.server.run, name="bgevl-api", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise BgevlError(f"the API server did not start on {self.host}:{self.port} (port in use?)")
            time.sleep(0.02)
        return self

    def wait_ready(self, timeout: float = 300.0) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health/ready", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            error = getattr(self.backend, "error", None)  # EmbedderBackend's load failure
            if error:
                raise BgevlError(error)
            time.sleep(0.1)
        raise BgevlError(f"the API's backend did not become ready within {timeout:.0f} s ({self.backend.state})")

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout)

    def __enter__(self) -> "ApiServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def read_api_key(path: Path | None, env: Mapping[str, str] = os.environ) -> str | None:
    """The API key from ``--api-key-file`` (first line) or ``$BGEVL_API_KEY``; None: no key required."""
    if path is not None:
        try:
            lines = path.read_text().strip().splitlines()
        except OSError as exc:
            raise BgevlError(f"--api-key-file {path}: cannot read it ({exc.strerror})") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise BgevlError(f"--api-key-file {path}: the file is empty; put the key on its first line")
        return key
    return env.get(API_KEY_ENV) or None


def add_api_options(p: argparse.ArgumentParser, port_default: int = DEFAULT_PORT, prefix: str = "") -> None:
    """The API's options (``bgevl-serve`` adds them with ``prefix='api-'``)."""
    g = p.add_argument_group("embeddings API")
    g.add_argument(f"--{prefix}port", dest="api_port", type=int, default=port_default, help="port of the API")
    if prefix:
        g.add_argument(f"--{prefix}host", dest="api_host", default=None, help="address the API listens on (None: --host)")
    else:
        g.add_argument("--host", dest="api_host", default=DEFAULT_HOST,
                       help="address to listen on; 0.0.0.0 exposes the API to every network the machine is on")
    g.add_argument(f"--{prefix}key-file" if prefix else "--api-key-file", dest="api_key_file", type=Path, default=None,
                   help=f"file whose first line is the API key clients must send (Authorization: Bearer KEY); "
                        f"None: ${API_KEY_ENV}, else no key")
    g.add_argument("--model-name", default=None, help="model id clients send and /v1/models lists (None: the "
                                                      "export directory's name, or the Triton model's)")
    g.add_argument("--max-in-flight", type=int, default=8, help="requests embedding at once")
    g.add_argument("--queue", type=int, default=64, help="requests waiting for a slot; more are answered 429")
    g.add_argument(f"--{prefix}timeout" if prefix else "--timeout", dest="api_timeout", type=float, default=60.0,
                   help="seconds to answer one request (then 504)")
    g.add_argument("--max-body-bytes", type=int, default=32 * 1024 * 1024, help="largest request body (then 413)")
    g.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds for a request's head (request line and headers) to arrive; then the connection is "
                        "closed (a client sending a byte a second held it for ever)")
    g.add_argument("--max-connections", type=int, default=None,
                   help="open connections at most; more are closed when accepted (default: the descriptor limit "
                        "less 128)")
    g.add_argument("--max-buffered-bytes", type=int, default=256 * 1024 * 1024,
                   help="request bodies held at once across all requests, read or being read (then 503 with "
                        "Retry-After; bounds memory before the in-flight limit applies)")
    g.add_argument("--max-decode-pixels", type=int, default=ApiOptions.max_decode_pixels,
                   help="estimated decode cost (pixels; more for a JPEG of many scans) of the images computing at once "
                        "across requests; a request that would pass it waits (text never does)")
    g.add_argument("--allow-image-host", action="append", default=[], metavar="HOST",
                   help="fetch http(s) image URLs from this host (repeatable; none: URLs are refused)")
    g.add_argument("--max-image-bytes", type=int, default=20 * 1024 * 1024, help="largest fetched image")
    g.add_argument("--embedding-ranges", type=Path, default=None, metavar="PATH",
                   help="the int8/uint8 calibration ranges (embedding_ranges.json, or the export directory holding it: "
                        "bgevl-export ranges); None: the served export's, where it has them")
    g.add_argument("--cache-size", type=_cache_size, default=0, metavar="BYTES",
                   help="an LRU cache of embeddings of this size (e.g. 512M, 2G), keyed by model, item content, role, "
                        "instruction and truncate; hits, misses and evictions on /metrics; 0: none")
    g.add_argument("--otlp-endpoint", default=None, metavar="URL",
                   help="send OpenTelemetry traces of the embedding requests to this OTLP/HTTP collector (e.g. "
                        "http://localhost:4318): a span per request with read body, queue wait, decode, model call and "
                        "Triton call spans; None: no traces")


def load_ranges(path: Path, required: bool) -> EmbeddingRanges | None:
    """The calibration ranges of ``--embedding-ranges`` (a file or a directory holding one), refused in one line
    when ``required`` and missing."""
    ranges = EmbeddingRanges.load(path)
    if ranges is None and required:
        raise BgevlError(f"--embedding-ranges {path}: no {RANGES_FILE} there; write it with 'bgevl-export ranges "
                         f"EXPORT_DIR --data DIR'")
    return ranges


def _cache_size(text: str) -> int:
    from bgevl.api.cache import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def api_options(args: argparse.Namespace) -> ApiOptions:
    for name in ("max_in_flight", "max_body_bytes", "max_buffered_bytes", "max_image_bytes", "max_decode_pixels"):
        if getattr(args, name) < 1:
            raise BgevlError(f"--{name.replace('_', '-')}: must be at least 1")
    if args.queue < 0 or args.api_timeout <= 0:
        raise BgevlError("--queue must be >= 0 and --timeout > 0")
    if args.header_timeout <= 0 or (args.max_connections is not None and args.max_connections < 1):
        raise BgevlError("--header-timeout must be > 0 and --max-connections at least 1")
    hosts = frozenset(h.lower().strip() for h in args.allow_image_host)
    return ApiOptions(api_key=read_api_key(args.api_key_file), max_in_flight=args.max_in_flight, queue=args.queue,
                      timeout_s=args.api_timeout, max_body_bytes=args.max_body_bytes,
                      max_buffered_bytes=args.max_buffered_bytes, header_timeout_s=args.header_timeout,
                      max_connections=args.max_connections, cache_bytes=args.cache_size, otlp_endpoint=args.otlp_endpoint,
                      max_decode_pixels=args.max_decode_pixels,
                      ranges=load_ranges(args.embedding_ranges, required=True) if args.embedding_ranges else None,
                      fetch=FetchPolicy(hosts=hosts, max_bytes=args.max_image_bytes))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bgevl-api", formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=(
        "OpenAI-compatible embeddings API (POST /v1/embeddings with texts, images and composed items; GET /v1/models, "
        "/health/live, /health/ready, /metrics, OpenAPI page at /docs) for a BGE-VL export directory, run in this "
        "process, or in front of a running Triton server (--triton-url). Ctrl-C (SIGINT/SIGTERM) finishes the "
        "requests in flight and stops."))
    p.add_argument("export_dir", type=Path, nargs="?", help="export directory (holding manifest.json)")
    p.add_argument("--triton-url", default=None, help="forward to this Triton's gRPC endpoint (host:port) instead of "
                                                      "running the model here")
    p.add_argument("--triton-model", default="bgevl", help="the entry model on that Triton")
    p.add_argument("--backend", default="onnxruntime", choices=BACKENDS,
                   help="runtime backend (in-process serving)")
    p.add_argument("--provider", default="auto", help="ONNX Runtime provider: auto, cpu, cuda, tensorrt")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads of the runtime")
    p.add_argument("--workers", type=int, default=2, help="encode calls run at once in this process")
    add_api_options(p)
    return p


def _load(args: argparse.Namespace, ready: dict[str, Any]) -> int:
    """The options and the backend, loaded before the server listens (errors in one line, and ready as soon as
    it listens)."""
    if (args.export_dir is None) == (args.triton_url is None):
        raise BgevlError("give an export directory or --triton-url HOST:PORT (one of them)")
    ready["options"] = api_options(args)
    if ready["options"].ranges is None and args.export_dir is not None:  # the served export's, where it has them
        ready["options"] = dataclasses.replace(ready["options"], ranges=load_ranges(args.export_dir, required=False))
    if args.triton_url:
        ready["backend"] = TritonBackend(args.triton_url, model=args.triton_model, name=args.model_name,
                                         timeout_s=args.api_timeout)
        return 0
    if not (args.export_dir / "manifest.json").is_file():
        raise BgevlError(f"{args.export_dir}: no manifest.json; pass an export directory written by bgevl-export")
    backend = EmbedderBackend(args.export_dir, name=args.model_name, workers=args.workers, load_options={
        "backend": args.backend, "provider": args.provider, "threads": args.threads})
    print(f"bgevl-api: loading {args.export_dir} ...", flush=True)
    backend.load()
    ready["backend"] = backend
    return 0


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ready: dict[str, Any] = {}
    code = run_cli("bgevl-api", lambda: _load(args, ready))  # then uvicorn handles the signals (graceful shutdown)
    if code:
        return code
    backend, options = ready["backend"], ready["options"]
    app = create_app(backend, options)
    host = "localhost" if args.api_host in ("127.0.0.1", "0.0.0.0", "::") else args.api_host
    print(f"bgevl-api: model {backend.name!r} at http://{host}:{args.api_port}/v1/embeddings (listening on "
          f"{args.api_host}; OpenAPI page /docs){'; API key required' if options.api_key else ''}", flush=True)
    config = uvicorn_config(app, options, host=args.api_host, port=args.api_port, log_level="info",
                            timeout_graceful_shutdown=int(args.api_timeout) + 5)
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
