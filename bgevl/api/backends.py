"""What answers the API's embedding calls: the runtime in this process, or a running Triton server.

A backend embeds one *group* of items of the same kind (images, texts, or composed pairs) with one
role and instruction, and says how many prompt tokens the group cost. Input errors are
:class:`bgevl.core.errors.InputError` naming the item by its index in the group (``images[2]``,
``text[0]``) as the runtime does; the app renames them after the request's own items.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bgevl.api.tracing import SPAN_TRITON, Tracing
from bgevl.core.errors import BgevlError, InputError

log = logging.getLogger("bgevl.api")


@dataclass
class Embedded:
    vectors: np.ndarray  # float32 [n, dim], L2-normalized
    tokens: int


class BackendUnavailable(BgevlError):
    """The backend cannot answer now (loading, or its server is down): HTTP 503."""


class EmbeddingBackend(ABC):
    """The API's view of a model: a name, a dimension, readiness, and ``embed`` on one group of items."""

    #: the model id clients send (``model``) and ``/v1/models`` lists
    name: str
    #: what ``/health/ready`` reports while not ready
    state: str = "starting"
    #: the app's tracer (``create_app`` sets it): spans of calls to another server
    tracing: Tracing = Tracing()

    @property
    @abstractmethod
    def dim(self) -> int | None:
        """The embedding dimension (None until known)."""

    async def start(self) -> None:
        """Begin loading / connecting; returns without waiting for readiness."""

    async def close(self) -> None:
        """Release what ``start`` took."""

    @abstractmethod
    async def ready(self) -> bool:
        """Whether ``embed`` can answer now."""

    @abstractmethod
    async def embed(self, images: list[bytes] | None, texts: list[str] | None, role: str | None,
                    instruction: str | None, truncate: str | None = None) -> Embedded:
        """Embeddings of one group (``images`` and ``texts`` paired item by item when both are given); ``truncate``
        as ``Embedder.encode`` takes it (``None``: the model's own handling of over-long texts)."""


class EmbedderBackend(EmbeddingBackend):
    """``bgevl.runtime.Embedder`` in this process. Encode calls block (ONNX Runtime, OpenVINO, TensorRT
    release the GIL while they run), so they run in a thread pool of ``workers`` threads; the event loop
    only parses, decodes base64 and answers. Text-only groups run in a pool of their own: a request of a
    few texts costs milliseconds and never waits behind images being decoded and run (two requests of
    near-limit images held every worker for seconds while one-text requests queued behind them)."""

    def __init__(self, export_dir: str | os.PathLike, *, name: str | None = None, workers: int = 2,
                 load_options: dict[str, Any] | None = None, embedder: Any = None):
        """``embedder``: an already loaded ``Embedder`` of ``export_dir`` (else ``start`` loads one)."""
        self.export_dir = Path(export_dir)
        self.name = name or self.export_dir.resolve().name
        self.load_options = dict(load_options or {})
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bgevl-api-encode")
        self.text_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bgevl-api-text")
        self.embedder = embedder
        self._owns_embedder = False  # one it loaded itself is closed with it; one given to it is the caller's
        self.error: str | None = None
        self._loading: asyncio.Future | None = None

    @property
    def dim(self) -> int | None:
        return self.embedder.dim if self.embedder is not None else None

    def load(self) -> None:
        """Load the export now (blocking); raises what ``Embedder.load`` raises."""
        from bgevl.runtime import Embedder

        self.embedder = Embedder.load(self.export_dir, **self.load_options)
        self._owns_embedder = True

    async def start(self) -> None:
        if self.embedder is not None:
            return

        def load() -> None:
            try:
                self.load()
            except Exception as exc:  # reported by /health/ready and the log; the process keeps answering
                self.error = f"loading {self.export_dir} failed: {exc}"
                self.state = "failed"
                log.error("bgevl-api: %s", self.error)

        self.state = "loading"
        self._loading = asyncio.get_running_loop().run_in_executor(self.pool, load)

    async def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.text_pool.shutdown(wait=False, cancel_futures=True)
        if self.embedder is not None and self._owns_embedder:
            # its runners are freed once the calls still in the pool's threads have ended
            await asyncio.get_running_loop().run_in_executor(None, self._close_when_idle, self.embedder)

    def _close_when_idle(self, embedder: Any) -> None:
        self.pool.shutdown(wait=True)
        self.text_pool.shutdown(wait=True)
        embedder.close()

    async def ready(self) -> bool:
        return self.embedder is not None

    def _encode(self, images, texts, role, instruction, truncate=None, cancelled=None) -> Embedded:
        tokens = 0

        def count(feeds) -> None:
            nonlocal tokens
            tokens += self.embedder.family.prompt_tokens(feeds)

        vectors = self.embedder.encode(images=images, text=texts, role=role, instruction=instruction, truncate=truncate,
                                       on_feeds=count, cancelled=cancelled)
        return Embedded(vectors, tokens)

    async def embed(self, images, texts, role, instruction, truncate=None) -> Embedded:
        if self.embedder is None:
            raise BackendUnavailable(self.error or f"the model is still loading from {self.export_dir}")
        pool = self.text_pool if images is None else self.pool
        stop = threading.Event()
        work = pool.submit(self._encode, images, texts, role, instruction, truncate, stop.is_set)
        result = asyncio.wrap_future(work)
        try:
            return await asyncio.shield(result)
        except asyncio.CancelledError:
            # the request timed out or its client went away: the work stops before its next batch (or never
            # starts), and this call returns only once the thread has let go, so the admission slot the request
            # holds covers the work it started
            stop.set()
            work.cancel()
            with contextlib.suppress(BaseException):
                await result
            raise


class TritonBackend(EmbeddingBackend):
    """A running Triton server's entry model (``bgevl`` of a repository written by ``bgevl-export``) over
    gRPC with the asyncio client: Triton keeps the batching, the instances and the GPU engines. Items go
    as BYTES tensors ``[n, 1]`` (image file bytes, UTF-8 texts), split at the entry model's
    ``max_batch_size``. Prompt tokens are counted with the repository's tokenizer when one is given
    (``tokenizer_dir``: the preprocess model's ``processor`` folder): text tokens only, since the image
    tokens are made inside the server."""

    def __init__(self, url: str, *, model: str = "bgevl", name: str | None = None, timeout_s: float = 60.0,
                 tokenizer_dir: str | os.PathLike | None = None):
        self.url, self.model, self.name, self.timeout_s = url, model, name or model, timeout_s
        self.tokenizer_dir = tokenizer_dir
        self.client: Any = None  # tritonclient's asyncio InferenceServerClient, once started
        self.inputs: set[str] = set()
        self.max_batch = 1
        self._dim: int | None = None
        self._tokenizer: Any = None  # transformers tokenizer, loaded on first use
        self._lock = threading.Lock()

    @property
    def dim(self) -> int | None:
        return self._dim

    async def start(self) -> None:
        import tritonclient.grpc.aio as grpcclient

        self.client = grpcclient.InferenceServerClient(self.url)
        self.state = "connecting"

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    async def ready(self) -> bool:
        from tritonclient.utils import InferenceServerException

        try:
            if not await self.client.is_model_ready(self.model):
                self.state = f"Triton at {self.url} reports model {self.model!r} not ready"
                return False
            if self._dim is None:
                await self._read_config()
            return True
        except InferenceServerException as exc:
            self.state = f"Triton at {self.url} does not answer ({exc.message().splitlines()[0] if exc.message() else exc})"
            return False

    async def _read_config(self) -> None:
        config = (await self.client.get_model_config(self.model, as_json=True))["config"]
        self.inputs = {i["name"] for i in config.get("input", [])}
        self.max_batch = max(1, int(config.get("max_batch_size", 1)))
        [output] = config["output"]
        self._dim = int(output["dims"][-1])

    def _count_text_tokens(self, texts: list[str]) -> int:
        if self.tokenizer_dir is None:
            return 0
        with self._lock:  # tokenizers are not safe to load twice concurrently
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        return sum(len(ids) for ids in self._tokenizer(texts)["input_ids"])

    async def embed(self, images, texts, role, instruction, truncate=None) -> Embedded:
        import tritonclient.grpc.aio as grpcclient
        from tritonclient.utils import InferenceServerException

        from bgevl.core.specs import (
            SERVING_EMBEDDING, SERVING_IMAGE, SERVING_INSTRUCTION, SERVING_ROLE, SERVING_TEXT, SERVING_TRUNCATE,
        )

        if self._dim is None and not await self.ready():
            raise BackendUnavailable(self.state)
        if instruction is not None and SERVING_INSTRUCTION not in self.inputs:
            raise InputError(f"instruction: model {self.name!r} takes no task instruction; put the task into the text")
        if truncate not in (None, "NONE") and texts is not None and SERVING_TRUNCATE not in self.inputs:
            raise InputError(f"truncate: model {self.name!r} of this Triton repository takes no {SERVING_TRUNCATE} input "
                             f"(a repository written before it); write the repository again with bgevl-export, or send "
                             f"truncate NONE", field="truncate")
        n = len(images if images is not None else texts)
        out = []
        for start in range(0, n, self.max_batch):
            stop = min(n, start + self.max_batch)
            columns = {}
            if images is not None:
                columns[SERVING_IMAGE] = list(images[start:stop])
            if texts is not None:
                columns[SERVING_TEXT] = [t.encode() for t in texts[start:stop]]
            if role is not None and SERVING_ROLE in self.inputs:
                columns[SERVING_ROLE] = [role.encode()] * (stop - start)
            if instruction is not None:
                columns[SERVING_INSTRUCTION] = [instruction.encode()] * (stop - start)
            if truncate is not None and SERVING_TRUNCATE in self.inputs:
                columns[SERVING_TRUNCATE] = [truncate.encode()] * (stop - start)
            inputs = []
            for key, values in columns.items():
                tensor = grpcclient.InferInput(key, [len(values), 1], "BYTES")
                tensor.set_data_from_numpy(np.array(values, dtype=object).reshape(-1, 1))
                inputs.append(tensor)
            try:
                with self.tracing.span(SPAN_TRITON, model=self.model, items=stop - start):
                    result = await self.client.infer(self.model, inputs, client_timeout=self.timeout_s,
                                                     headers=self.tracing.headers())
            except InferenceServerException as exc:
                error = triton_error(exc, start)
                if not isinstance(error, InputError) and not await self.ready():
                    # the model went away under the request (bgevl-serve unloads it and its callers while it
                    # reloads a dead model): unavailable for now, a 503 with Retry-After, not an internal error
                    raise BackendUnavailable(f"{self.state}; {str(error).splitlines()[0]}") from None
                raise error from None
            out.append(result.as_numpy(SERVING_EMBEDDING).astype(np.float32, copy=False))
        tokens = await asyncio.to_thread(self._count_text_tokens, texts) if texts is not None else 0
        return Embedded(np.concatenate(out), tokens)


def triton_error(exc, start: int) -> Exception:
    """A Triton error -> an InputError (INVALID_ARGUMENT: the preprocess model's message, item indices
    shifted to the group's), BackendUnavailable (UNAVAILABLE, a dead connection), or the error itself."""
    import re

    status, message = str(exc.status() or ""), exc.message() or str(exc)
    if "INVALID_ARG" in status:
        # the preprocess model's InputError crossed the process boundary as text: its item, read once here
        item = re.search(r"\b(images|text)\[(\d+)\](?: <\d+ bytes>| '[^']*')?: (.*)", message, re.S)
        if item is None:
            return InputError(message, field=message.split(":", 1)[0].split()[0] if message.strip() else None)
        field, index, reason = item.group(1), int(item.group(2)) + start, item.group(3)
        return InputError(f"{field}[{index}]: {reason}", field=field, index=index, reason=reason)
    if "UNAVAILABLE" in status or "DEADLINE" in status:
        return BackendUnavailable(f"Triton did not answer: {message.splitlines()[0] if message else status}")
    return RuntimeError(f"Triton: {status} {message}")
