"""The FastAPI application: ``POST /v1/embeddings`` in OpenAI's shape, ``/v1/models``, health and metrics.

A request is parsed (pydantic), its items resolved (images: base64 / data URLs decoded, allowed URLs
fetched), grouped by kind (image-only, text-only, composed; one backend call each, since the
families' encoders pair images and texts item by item), embedded by the backend, and answered in
item order. Errors are OpenAI's error object; an input error names the request's own item
(``input[3].image``) and fails only its request.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, cast

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from bgevl.api.backends import BackendUnavailable, EmbeddingBackend
from bgevl.api.cache import EmbeddingCache
from bgevl.api.parsing import ApiError, ParsedItem
from bgevl.api.images import FetchPolicy, decode_reference, fetch, is_image_data_url, is_url
from bgevl.api.tracing import (
    SPAN_DECODE, SPAN_DECODE_BUDGET, SPAN_MODEL_CALL, SPAN_QUEUE_WAIT, SPAN_READ_BODY, TraceRequests, Tracing,
)
from bgevl.api.schemas import INPUT_TYPES, EmbeddingRequest, EmbeddingResponse, ErrorResponse, Item, ModelCard, ModelList
from bgevl.core.compact import EmbeddingRanges, needs_ranges, quantize, to_base64
from bgevl.core.errors import InputError
from bgevl.core.preprocessing import decode_cost
from bgevl.core.family import Kind

log = logging.getLogger("bgevl.api")

#: OpenAI's limit on the items of one request
MAX_ITEMS = 2048


@dataclass(frozen=True)
class ApiOptions:
    """What the server admits: ``max_in_flight`` requests embedding at once, ``queue`` more waiting (then
    429), each answered within ``timeout_s`` (then 504), bodies up to ``max_body_bytes`` (then 413), and at
    most ``max_buffered_bytes`` of request bodies held across all requests, read or being read (then 503
    with Retry-After: the bound applies while bodies arrive, before the in-flight limit)."""

    api_key: str | None = None
    max_in_flight: int = 8
    queue: int = 64
    timeout_s: float = 60.0
    max_body_bytes: int = 32 * 1024 * 1024
    max_buffered_bytes: int = 256 * 1024 * 1024
    #: a request's head must be complete within this many seconds (``bgevl.api.connections``)
    header_timeout_s: float = 10.0
    #: open connections at most (None: the descriptor limit less a margin)
    max_connections: int | None = None
    max_items: int = MAX_ITEMS
    fetch: FetchPolicy = field(default_factory=FetchPolicy)
    retry_after_s: int = 1
    #: the export's int8/uint8 calibration ranges (``embedding_ranges.json``), for those output types
    ranges: EmbeddingRanges | None = None
    #: bytes of the embedding cache (``bgevl.api.cache``); 0: no cache
    cache_bytes: int = 0
    #: pixels being decoded and embedded at once across requests (``DecodeBudget``): a request whose images'
    #: estimated decode cost would pass it waits (text costs nothing and never waits); 200 M: five images at
    #: the 40 M pixel limit
    max_decode_pixels: int = 200_000_000
    #: an OpenTelemetry collector's OTLP/HTTP URL for the requests' traces (``bgevl.api.tracing``); None: no traces
    otlp_endpoint: str | None = None


# --- parsing ----------------------------------------------------------------------------------

_LOC_FIELDS = {"input", "messages", "content", "text", "image", "image_url", "url", "type", "model", "encoding_format",
               "dimensions", "input_type", "instruction", "user", "role", "embed_dtype",
               # Cohere's /v2/embed
               "texts", "images", "inputs", "embedding_types", "output_dimension", "truncate", "max_tokens"}


def _param(loc: tuple) -> str | None:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _LOC_FIELDS:
            out += f".{part}" if out else part
    return out or None


def validation_error(exc: ValidationError, schema: Any = None) -> ApiError:
    """pydantic's errors -> one 400 naming the most specific field (union branches give one error each)."""
    schema = schema or EmbeddingRequest
    errors = exc.errors(include_url=False)
    best = max(errors, key=lambda e: (e["type"] in ("extra_forbidden", "missing"), len(e["loc"])))
    param = _param(best["loc"])
    if best["type"] == "extra_forbidden":
        param = _param(best["loc"][:-1]) or str(best["loc"][-1])
        known = ", ".join(schema.model_fields) if len(best["loc"]) == 1 else "text, image"
        message = f"unknown field {best['loc'][-1]!r} (the fields are: {known})"
    elif best["type"] == "json_invalid":
        message = f"the body is not valid JSON ({best.get('ctx', {}).get('error', best['msg'])})"
    else:
        message = best["msg"]
    return ApiError(400, f"{param}: {message}" if param else message, param=param)


def parse_items(body: EmbeddingRequest, max_items: int) -> list[ParsedItem]:
    if (body.input is None) == (body.messages is None):
        raise ApiError(400, "send either 'input' (texts, {text, image} items) or 'messages' (one item of text and "
                            "image_url parts)", param="input")
    if body.messages is not None:
        return [_message_item(body.messages)]
    values = [body.input] if isinstance(body.input, str) else body.input
    if not values:
        raise ApiError(400, "input: empty list; send at least one text or item", param="input")
    if len(values) > max_items:
        raise ApiError(400, f"input: {len(values)} items, over the limit of {max_items} per request; split the request",
                       param="input")
    items = []
    for i, value in enumerate(values):
        label = f"input[{i}]"
        if isinstance(value, (int, list)):
            raise ApiError(400, "input: token-id arrays are not accepted; BGE-VL tokenizes with its own tokenizer, so send "
                                "the text (LangChain: OpenAIEmbeddings(..., check_embedding_ctx_length=False))",
                           param="input")
        if isinstance(value, str):
            items.append(ParsedItem(label, None, value) if is_image_data_url(value) else ParsedItem(label, value, None))
        else:
            assert isinstance(value, Item)
            if value.text is None and value.image is None:
                raise ApiError(400, f"{label}: an item needs 'text', 'image' or both", param=label)
            items.append(ParsedItem(label, value.text, value.image))
    return items


def _message_item(messages) -> ParsedItem:
    texts, images = [], []
    for m, message in enumerate(messages):
        if isinstance(message.content, str):
            texts.append(message.content)
            continue
        for part in message.content:
            if part.type == "text":
                texts.append(part.text)
            else:
                images.append(part.image_url.url)
    if len(images) > 1:
        raise ApiError(400, f"messages: {len(images)} images; one item takes at most one image (send one request per item)",
                       param="messages")
    if not texts and not images:
        raise ApiError(400, "messages: no text or image_url part", param="messages")
    return ParsedItem("messages", "\n".join(texts) if texts else None, images[0] if images else None)


def renamed(exc: InputError, items: list[ParsedItem]) -> ApiError:
    """A backend's input error about item ``exc.index`` of a group (``InputError.field``/``index``) -> the
    request's own item (``input[3].image``), or the request field it is about."""
    if exc.index is not None and 0 <= exc.index < len(items) and exc.field in ("images", "text"):
        param = f"{items[exc.index].label}.{'image' if exc.field == 'images' else 'text'}"
        return ApiError(400, f"{param}: {exc.reason}", param=param)
    return ApiError(400, str(exc), param={"instruction": "instruction", "role": "input_type", "truncate": "truncate"}.get(exc.field or ""))


# --- the app ----------------------------------------------------------------------------------

class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("bgevl_api_requests", "HTTP requests by route and status code", ["route", "code"],
                                registry=self.registry)
        self.latency = Histogram("bgevl_api_request_seconds", "Time to answer, by route", ["route"], registry=self.registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.items = Counter("bgevl_api_items", "Items embedded, by kind", ["kind"], registry=self.registry)
        self.tokens = Counter("bgevl_api_prompt_tokens", "Prompt tokens counted in usage", registry=self.registry)
        self.in_flight = Gauge("bgevl_api_in_flight", "Embedding requests being computed", registry=self.registry)
        self.queued = Gauge("bgevl_api_queued", "Embedding requests waiting for a slot", registry=self.registry)
        self.decode_pixels = Gauge("bgevl_api_decode_pixels", "Estimated decode cost (pixels) of the requests "
                                   "computing", registry=self.registry)
        self.decode_waiting = Gauge("bgevl_api_decode_waiting", "Requests waiting for the decode budget",
                                    registry=self.registry)
        self.cancelled = Counter("bgevl_api_cancelled", "Requests whose work was stopped, by reason (timeout, "
                                 "client_closed)", ["reason"], registry=self.registry)
        self.cache_hits = Counter("bgevl_api_cache_hits", "Items answered from the embedding cache", registry=self.registry)
        self.cache_misses = Counter("bgevl_api_cache_misses", "Items the embedding cache did not hold", registry=self.registry)
        self.cache_evictions = Counter("bgevl_api_cache_evictions", "Embeddings evicted from the cache (LRU)",
                                       registry=self.registry)
        self.cache_bytes = Gauge("bgevl_api_cache_bytes", "Bytes the embedding cache holds", registry=self.registry)


ROUTES = {"/v1/embeddings", "/v2/embed", "/v1/models", "/health/live", "/health/ready", "/metrics"}


class CountRequests:
    """Requests by route and status, and their latency: a plain ASGI middleware (Starlette's
    ``BaseHTTPMiddleware`` runs every request through an extra task and memory stream)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


class BodyBudget:
    """The bytes of request bodies the server holds at once (``ApiOptions.max_buffered_bytes``): a request
    takes its declared length before its body is read (or each chunk as it comes, without a declared length)
    and gives it back when it is answered. One event loop: no lock."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0

    def take(self, size: int, retry_after_s: int) -> None:
        if self.held + size > self.limit:
            raise ApiError(503, f"the server holds {self.held} bytes of request bodies, and this one would pass its "
                                f"limit of {self.limit}; retry after {retry_after_s} s", type_="server_error",
                           code="busy", headers={"Retry-After": str(retry_after_s)})
        self.held += size

    def give(self, size: int) -> None:
        self.held -= size


class DecodeBudget:
    """Admission by work, not bytes (``ApiOptions.max_decode_pixels``): a request's images cost their estimated
    decode (``bgevl.core.preprocessing.decode_cost``: header pixels, more for a JPEG of many scans), held while
    the request computes. A 5 KB PNG can declare 40 M pixels and a few hundred KB of JPEG minutes of scans, so the
    in-flight count alone let a few such requests take every core and gigabytes. Requests wait in order; one
    costing more than the whole budget runs when nothing else holds it; text costs nothing and never waits.
    One event loop: no lock."""

    def __init__(self, limit: int, metrics: "Metrics"):
        self.limit, self.held, self.metrics = limit, 0, metrics
        self.waiters: deque[tuple[int, asyncio.Future]] = deque()

    async def acquire(self, cost: int) -> int:
        """Waits until ``cost`` (capped at the budget) fits; returns what to :meth:`release`."""
        cost = min(cost, self.limit)
        if cost == 0:
            return 0
        if not self.waiters and self.held + cost <= self.limit:
            self._take(cost)
            return cost
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append((cost, waiter))
        self.metrics.decode_waiting.set(len(self.waiters))
        try:
            await waiter  # granted by _wake
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(cost)  # granted while being cancelled: pass it on
            else:
                self.waiters.remove((cost, waiter))
                self._wake()
            raise
        finally:
            self.metrics.decode_waiting.set(len(self.waiters))
        return cost

    def release(self, cost: int) -> None:
        self._take(-cost)
        self._wake()

    def _take(self, cost: int) -> None:
        self.held += cost
        self.metrics.decode_pixels.set(self.held)

    def _wake(self) -> None:
        while self.waiters and self.held + self.waiters[0][0] <= self.limit:
            cost, waiter = self.waiters.popleft()
            self._take(cost)
            waiter.set_result(None)


class Admission:
    """``max_in_flight`` slots and a queue of ``queue`` waiting requests; beyond it: 429."""

    def __init__(self, options: ApiOptions, metrics: Metrics):
        self.options, self.metrics = options, metrics
        self.free = options.max_in_flight
        self.waiters: list[asyncio.Future] = []

    async def acquire(self) -> None:
        if self.free > 0 and not self.waiters:
            self.free -= 1
            self.metrics.in_flight.inc()
            return
        if len(self.waiters) >= self.options.queue:
            raise ApiError(429, f"the server is at its limit ({self.options.max_in_flight} requests in flight, "
                                f"{self.options.queue} queued); retry after {self.options.retry_after_s} s",
                           type_="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(self.options.retry_after_s)})
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        self.metrics.queued.set(len(self.waiters))
        try:
            await waiter  # the slot is handed over by release()
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot while being cancelled: pass it on
            raise
        finally:
            if waiter in self.waiters:
                self.waiters.remove(waiter)
            self.metrics.queued.set(len(self.waiters))
        self.metrics.in_flight.inc()

    def release(self) -> None:
        self.metrics.in_flight.dec()
        while self.waiters:
            waiter = self.waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                return
        self.free += 1


#: how often a request in the queue or in flight asks whether its client is still there
CLIENT_POLL_S = 0.2


async def _client_gone(request: Request) -> None:
    """Returns once the client has closed the connection (Starlette's ``is_disconnected``, polled)."""
    while not await request.is_disconnected():
        await asyncio.sleep(CLIENT_POLL_S)


def _client_closed() -> ApiError:
    # nginx's 499: nobody reads it, but the request counter and the trace record it
    return ApiError(499, "the client closed the connection before the answer; its work was stopped",
                    type_="invalid_request_error", code="client_closed")


class EmbeddingsService:
    """What ``POST /v1/embeddings`` does: the key check (a FastAPI dependency of every ``/v1`` route), the
    body read under its size limit, image resolution, admission, the backend calls by item kind and the
    answer in OpenAI's shape. Failures raise :class:`ApiError` (answered by the app's exception handler)."""

    def __init__(self, backend: EmbeddingBackend, options: ApiOptions, metrics: Metrics, tracing: Tracing):
        self.backend, self.options, self.metrics, self.tracing = backend, options, metrics, tracing
        self.admission: Admission | None = None  # made in the app's lifespan, on its event loop
        self.bodies = BodyBudget(options.max_buffered_bytes)
        self.cache = EmbeddingCache(options.cache_bytes, metrics) if options.cache_bytes > 0 else None
        self.decode_budget = DecodeBudget(options.max_decode_pixels, metrics)

    def check_key(self, request: Request) -> None:
        if self.options.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.options.api_key.encode()):
            raise ApiError(401, "missing or wrong API key; send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def read_body(self, request: Request, held: list[int]) -> bytes:
        """The body, under its size limit and the server's body budget (what it takes is added to ``held``,
        given back by the caller when the request is answered)."""
        limit = self.options.max_body_bytes
        declared = request.headers.get("content-length")
        too_big = ApiError(413, f"the request body is over the limit of {limit} bytes; send fewer or "
                                f"smaller images per request", code="body_too_large")
        if declared and declared.isdigit():
            if int(declared) > limit:
                raise too_big
            self.bodies.take(int(declared), self.options.retry_after_s)
            held[0] += int(declared)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            if size > held[0]:  # no declared length, or more than it said
                self.bodies.take(size - held[0], self.options.retry_after_s)
                held[0] = size
            chunks.append(chunk)
        return b"".join(chunks)

    async def resolve_images(self, items: list[ParsedItem]) -> None:
        for item in items:
            if item.image is None:
                continue
            label = f"{item.label}.image"
            try:
                if is_url(item.image):
                    item.image_bytes = await asyncio.to_thread(fetch, item.image, label, self.options.fetch)
                else:
                    item.image_bytes = decode_reference(item.image, label)
            except InputError as exc:
                raise ApiError(400, str(exc), param=label) from None

    async def embed(self, items: list[ParsedItem], role: str | None, instruction: str | None,
                    truncate: str | None = None) -> tuple[np.ndarray, int]:
        """The items' vectors in item order and their tokens: one backend call per kind of item, for the items the
        cache does not hold (their tokens are not counted again)."""
        with self.tracing.span(SPAN_DECODE, images=sum(item.image is not None for item in items)):
            await self.resolve_images(items)
        dim = self.backend.dim
        assert dim is not None, "a backend that has embedded knows its dimension"
        out = np.empty((len(items), dim), np.float32)
        keys: dict[int, bytes] = {}
        groups: dict[Kind, list[int]] = {}
        for i, item in enumerate(items):
            if self.cache is not None:
                keys[i] = self.cache.key(self.backend.name, item.kind.value, item.text, item.image_bytes, role, instruction,
                                         truncate)
                cached = self.cache.get(keys[i])
                if cached is not None:
                    out[i] = cached
                    continue
            groups.setdefault(item.kind, []).append(i)

        async def one(kind: Kind, indices: list[int]) -> tuple[list[int], Any]:
            images = [cast(bytes, items[i].image_bytes) for i in indices] if kind.has_image else None  # resolved above
            texts = [cast(str, items[i].text) for i in indices] if kind.has_text else None
            try:
                with self.tracing.span(SPAN_MODEL_CALL, kind=kind.value, items=len(indices)):
                    return indices, await self.backend.embed(images, texts, role, instruction, truncate)
            except InputError as exc:
                raise renamed(exc, [items[i] for i in indices]) from None

        images = [items[i].image_bytes for indices in groups.values() for i in indices]
        cost = sum(decode_cost(image) for image in images if image is not None)
        with self.tracing.span(SPAN_DECODE_BUDGET, pixels=cost):
            held = await self.decode_budget.acquire(cost)
        try:
            results = await asyncio.gather(*(one(k, v) for k, v in groups.items()))
        finally:
            self.decode_budget.release(held)
        tokens = 0
        for indices, done in results:
            out[indices] = done.vectors
            tokens += done.tokens
            if self.cache is not None:
                for i, vector in zip(indices, np.asarray(done.vectors, np.float32)):
                    self.cache.put(keys[i], vector)
        for kind, indices in groups.items():
            self.metrics.items.labels(kind.value).inc(len(indices))
        return out, tokens

    async def parse(self, request: Request, held: list[int], schema: Any = EmbeddingRequest) -> Any:
        """The request's body, checked against what this server serves. Only JSON bodies: a web page may POST
        text/plain, form or multipart bodies to any origin without a CORS preflight, and would reach the
        model (and its API key's quota) from a user's browser."""
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            raise ApiError(415, f"Content-Type {media_type or 'missing'}: send the body as JSON with the header "
                                f"'Content-Type: application/json'", code="unsupported_media_type")
        try:
            body = schema.model_validate_json(await self.read_body(request, held))
        except ValidationError as exc:
            raise validation_error(exc, schema) from None
        backend = self.backend
        if body.model not in (None, "", backend.name):
            raise ApiError(404, f"model {body.model!r} is not served here; this server serves {backend.name!r} "
                                f"(GET /v1/models)", param="model", code="model_not_found")
        if backend.dim is None and not await backend.ready():
            raise ApiError(503, f"the model is not ready ({backend.state}); retry shortly", type_="server_error",
                           code="not_ready", headers={"Retry-After": "5"})
        param = "dimensions" if "dimensions" in schema.model_fields else "output_dimension"
        asked = getattr(body, param)
        if asked is not None and asked != backend.dim:
            raise ApiError(400, f"{param}: {asked} requested, but {backend.name!r} has {backend.dim} and "
                                f"BGE-VL is not trained for truncated (Matryoshka) embeddings; leave '{param}' out",
                           param=param)
        return body

    async def admitted(self, request: Request, items: list[ParsedItem], role: str | None, instruction: str | None,
                       truncate: str | None = None) -> tuple[np.ndarray, int]:
        """:meth:`embed` in an admission slot, answered within the timeout. A request whose client goes away while
        it waits leaves the queue; one that times out or whose client goes away while it computes has its work
        stopped (the backend stops before its next batch: ``Embedder.encode``'s ``cancelled``; a Triton call is
        cancelled), and holds its slot until that work has let go."""
        admission = self.admission
        assert admission is not None, "the app's lifespan has not started"
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            with self.tracing.span(SPAN_QUEUE_WAIT):
                slot = asyncio.ensure_future(admission.acquire())
                await asyncio.wait({slot, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not slot.done():
                    slot.cancel()  # Admission passes on a slot handed over meanwhile
                    raise _client_closed()
                slot.result()  # a full queue: 429
            task = asyncio.ensure_future(self.embed(items, role, instruction, truncate))

            def done(t: asyncio.Future) -> None:
                admission.release()
                if not t.cancelled():
                    t.exception()

            task.add_done_callback(done)
            finished, _ = await asyncio.wait({task, gone}, timeout=self.options.timeout_s,
                                             return_when=asyncio.FIRST_COMPLETED)
            if task in finished:
                return task.result()
            task.cancel()
            self.metrics.cancelled.labels("client_closed" if gone in finished else "timeout").inc()
            if gone in finished:
                raise _client_closed()
            raise ApiError(504, f"the embeddings took longer than the server's timeout of {self.options.timeout_s:g} s; "
                                f"send fewer items per request", type_="server_error", code="timeout")
        finally:
            gone.cancel()

    async def answer(self, request: Request) -> JSONResponse:
        """``POST /v1/embeddings``: OpenAI's answer; ``embed_dtype`` (vLLM's) sets the base64 vectors' type."""
        held = [0]  # bytes of the body budget this request holds until it is answered
        try:
            with self.tracing.span(SPAN_READ_BODY):
                body = await self.parse(request, held)
            if body.embed_dtype != "float32" and body.encoding_format != "base64":
                raise ApiError(400, f"embed_dtype: {body.embed_dtype} applies to base64 output; send "
                                    f"'encoding_format': 'base64' with it", param="embed_dtype")
            role = INPUT_TYPES[body.input_type] if body.input_type else None
            vectors, tokens = await self.admitted(request, parse_items(body, self.options.max_items), role,
                                                  body.instruction, body.truncate)
        finally:
            self.bodies.give(held[0])
        self.metrics.tokens.inc(tokens)
        if body.encoding_format == "base64":
            data = [{"object": "embedding", "index": i, "embedding": to_base64(v)}
                    for i, v in enumerate(quantize(vectors, body.embed_dtype))]
        else:
            data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors.tolist())]
        return JSONResponse({"object": "list", "data": data, "model": self.backend.name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def answer_cohere(self, request: Request) -> JSONResponse:
        """``POST /v2/embed``: Cohere's Embed v2 request and answer (``bgevl.api.cohere``)."""
        from bgevl.api.cohere import CohereEmbedRequest, cohere_items, cohere_response, cohere_role

        held = [0]
        try:
            with self.tracing.span(SPAN_READ_BODY):
                body = await self.parse(request, held, CohereEmbedRequest)
            needs = [t for t in body.embedding_types if needs_ranges(t)]
            if needs and self.options.ranges is None:
                raise ApiError(400, f"embedding_types: {', '.join(needs)} need this model's calibration ranges, which "
                                    f"the server was not given (the operator computes them with 'bgevl-export ranges "
                                    f"EXPORT_DIR --data DIR' and starts bgevl-api with them: --embedding-ranges)",
                               param="embedding_types")
            items = cohere_items(body, self.options.max_items)
            vectors, tokens = await self.admitted(request, items, cohere_role(body.input_type), body.instruction,
                                                  body.truncate)
        finally:
            self.bodies.give(held[0])
        self.metrics.tokens.inc(tokens)
        return JSONResponse(cohere_response(body, items, vectors, tokens, self.options.ranges))


#: The documented error answers of ``POST /v1/embeddings``.
EMBEDDINGS_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "bad input; `param` names the item (`input[3].image`)"},
    401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
    415: {"model": ErrorResponse, "description": "a body that is not application/json"},
    429: {"model": ErrorResponse, "description": "queue full; see Retry-After"},
    503: {"model": ErrorResponse, "description": "backend not ready"}, 504: {"model": ErrorResponse},
    500: {"model": ErrorResponse}}


def _error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: Starlette's (404, 405), :class:`ApiError`, an unavailable backend (503)."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = "not_found" if exc.status_code == 404 else None
        return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", param=None,
                        code=code).response()

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return exc.response()

    @app.exception_handler(BackendUnavailable)
    async def unavailable(request: Request, exc: BackendUnavailable) -> Response:
        return ApiError(503, f"the model is not ready: {exc}", type_="server_error", code="not_ready",
                        headers={"Retry-After": "5"}).response()


def _openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """The schema with the request body's model in it (the route reads the raw body under its size limit)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            from bgevl.api.cohere import CohereEmbedRequest

            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (EmbeddingRequest, CohereEmbedRequest):
                request_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(request_schema.pop("$defs", {}))
                components[model.__name__] = request_schema
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


async def _answered(route: str, answer: Awaitable[Response]) -> Response:
    """An embeddings route's answer; an unexpected error is one line to the client and its traceback in the log."""
    try:
        return await answer
    except (ApiError, BackendUnavailable):
        raise
    except Exception as exc:
        log.exception("bgevl-api: internal error on %s", route)
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return ApiError(500, f"internal error: {type(exc).__name__}{': ' + line if line else ''}",
                        type_="server_error", code="internal_error").response()


def create_app(backend: EmbeddingBackend, options: ApiOptions = ApiOptions()) -> FastAPI:
    """The API in front of ``backend``; ``uvicorn.run(create_app(...))`` serves it."""
    metrics = Metrics()
    tracing = Tracing(options.otlp_endpoint)
    backend.tracing = tracing
    service = EmbeddingsService(backend, options, metrics, tracing)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.admission = Admission(options, metrics)
        await backend.start()
        try:
            yield
        finally:
            await backend.close()
            tracing.shutdown()

    app = FastAPI(title="bgevl embeddings API", version="1", lifespan=lifespan, description=(
        "OpenAI's `/v1/embeddings` for the BGE-VL models, with images: `input` holds texts or items "
        "`{\"text\", \"image\"}` (image: data URL or base64), or vLLM's `messages` form. See docs/api.md."))
    app.state.backend, app.state.metrics, app.state.options = backend, metrics, options
    app.add_middleware(CountRequests, metrics=metrics)
    app.add_middleware(TraceRequests, tracing=tracing)
    _error_handlers(app)
    authorized = [Depends(service.check_key)]

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=EMBEDDINGS_ERRORS, dependencies=authorized,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": {"$ref": "#/components/schemas/EmbeddingRequest"}}}}})
    async def embeddings(request: Request) -> Response:
        """Embeddings of texts, images and composed image+text items (OpenAI's shape)."""
        return await _answered("/v1/embeddings", service.answer(request))

    @app.post("/v2/embed", responses=EMBEDDINGS_ERRORS, dependencies=authorized,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": {"$ref": "#/components/schemas/CohereEmbedRequest"}}}}})
    async def cohere_embed(request: Request) -> Response:
        """Cohere's Embed v2 (``texts``, ``images``, ``inputs``; ``embedding_types`` float, int8, uint8, binary,
        ubinary, base64), as vLLM's compatible endpoint serves it."""
        return await _answered("/v2/embed", service.answer_cohere(request))

    @app.get("/v1/models", response_model=ModelList, responses={401: {"model": ErrorResponse}}, dependencies=authorized)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=backend.name, created=int(app.state.started))])

    @app.get("/health/live")
    @app.get("/v1/health/live")  # NIM's path of the same probe
    async def live() -> dict[str, str]:
        return {"status": "live"}

    @app.get("/health/ready")
    @app.get("/v1/health/ready")  # NIM's path of the same probe
    async def ready() -> Any:
        if await backend.ready():
            return {"status": "ready", "model": backend.name}
        return JSONResponse({"status": "not ready", "reason": backend.state}, status_code=503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.state.started = time.time()
    app.openapi = _openapi(app)  # type: ignore[method-assign]
    return app
