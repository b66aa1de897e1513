"""OpenTelemetry traces of the API's requests, sent over OTLP/HTTP to a collector (``--otlp-endpoint``, as
TEI and NIM take it; off by default).

Each ``POST /v1/embeddings`` and ``/v2/embed`` is one server span (``POST /v1/embeddings``), joined to the
caller's trace when the request carries a W3C ``traceparent`` header, with child spans for what a slow request
spends its time on: ``read body`` (the body under the server's limits, JSON checked), ``queue wait`` (for an
admission slot), ``decode`` (images from base64 or fetched URLs), ``decode budget`` (waiting for the pixels
the request's images cost: ``bgevl.api.app.DecodeBudget``), one ``model call`` per kind of item, and in
the Triton backend a ``triton infer`` per call to the server, whose gRPC metadata carries the trace context on
(a Triton started with ``--trace-config mode=opentelemetry`` joins it). The spans use the OpenTelemetry
SDK's own tracer provider, exporter and batch processor (``opentelemetry-sdk``,
``opentelemetry-exporter-otlp-proto-http``); this module only says where the spans go and what they are
called. The provider is the app's, not the process's global one: two apps in one process trace apart.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

#: what each span is called (one place: the docs and tests read them from here)
SPAN_READ_BODY, SPAN_QUEUE_WAIT, SPAN_DECODE, SPAN_DECODE_BUDGET, SPAN_MODEL_CALL, SPAN_TRITON = (
    "read body", "queue wait", "decode", "decode budget", "model call", "triton infer")
#: the routes traced, each a server span named "POST <route>"
TRACED_ROUTES = ("/v1/embeddings", "/v2/embed")


def traces_url(endpoint: str) -> str:
    """A collector's base URL (``http://collector:4318``) -> its OTLP/HTTP traces URL; a URL that already ends
    in ``/v1/traces`` is kept, as the SDK's ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` takes it."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else f"{endpoint}/v1/traces"


class Tracing:
    """The app's tracer: spans to ``endpoint`` (an OTLP/HTTP collector), or none at all (``None``: the API's
    no-op tracer, which costs nothing)."""

    def __init__(self, endpoint: str | None = None, service_name: str = "bgevl-api"):
        self.provider: Any = None
        if endpoint is None:
            self.tracer: Any = trace.NoOpTracer()
            return
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url(endpoint))))
        self.tracer = self.provider.get_tracer("bgevl.api")

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    @contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[Any]:
        """A child span of the current one (contextvars: it follows the request's task and the tasks it gathers)."""
        with self.tracer.start_as_current_span(name, attributes={f"bgevl.{k}": v for k, v in attributes.items()}) as span:
            yield span

    def headers(self) -> dict[str, str]:
        """The current trace context as W3C headers (``traceparent``), for a call to another server."""
        carrier: dict[str, str] = {}
        if self.enabled:
            propagate.inject(carrier)
        return carrier

    def shutdown(self) -> None:
        """Send the spans still buffered, then stop (the app's lifespan ends with it)."""
        if self.provider is not None:
            self.provider.shutdown()


class TraceRequests:
    """The server span of each traced route: a plain ASGI middleware, like the app's request counter, so the span
    is current in the task that runs the route and its children nest under it."""

    def __init__(self, app: Any, tracing: Tracing):
        self.app, self.tracing = app, tracing

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.tracing.enabled or scope["path"] not in TRACED_ROUTES:
            return await self.app(scope, receive, send)
        carrier = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        name = f"{scope['method']} {scope['path']}"
        with self.tracing.tracer.start_as_current_span(
                name, context=propagate.extract(carrier), kind=SpanKind.SERVER,
                attributes={"http.request.method": scope["method"], "url.path": scope["path"]}) as span:

            async def sending(message: Any) -> None:
                if message["type"] == "http.response.start":
                    span.set_attribute("http.response.status_code", message["status"])
                    if message["status"] >= 500:
                        span.set_status(Status(StatusCode.ERROR))
                await send(message)

            await self.app(scope, receive, sending)
