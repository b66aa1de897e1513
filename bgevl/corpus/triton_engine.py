"""A Triton server as the engine (``bgevl-embed --triton URL``): the model stays on the server (``bgevl-serve``).

Items are read and checked here as in the local engine: each image is decoded once with the export's
own preprocessor (``Preprocessor.decode_image``: limits, format, corruption), each text checked, so a bad
item is a failure of its own and never fails a request of 64; the encoded bytes and UTF-8 texts are then
sent to the repository's entry model (``IMAGE``/``TEXT`` BYTES ``[n, 1]``, plus ``ROLE``/``INSTRUCTION``
where the family serves them) and its ``EMBEDDING`` is stored. A request the server refuses is retried
item by item, so only the items it refuses are failures. A server that is unreachable, or whose model is
not ready (``bgevl-serve`` unloads a model and its callers while it reloads a dead one), is waited for
with backoff for up to ``retry_window_s``; its errors are never recorded as item failures: if it does not
come back in time the job ends non-zero with one line, its complete partitions kept, and the same
command resumes with the items that were not embedded. The export directory must be the one the
repository was written from (its manifest identifies the model in the output).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np

from bgevl.core.errors import BgevlError, InputError
from bgevl.core.registry import get_family
from bgevl.core.family import COMPOSED, IMAGE, TEXT, Request
from bgevl.corpus.pipeline import BatchEmbedder, BatchResult, reason_of
from bgevl.core.specs import SERVING_EMBEDDING, SERVING_IMAGE, SERVING_INSTRUCTION, SERVING_ROLE, SERVING_TEXT, items_per_step


#: how long a server that went away (unreachable, or its model not ready) is waited for before the job ends
RETRY_WINDOW_S = 120.0


class ServerUnavailable(BgevlError):
    """The server stayed unreachable or its model not ready for the whole retry window: the job ends (its
    complete partitions kept); no item is recorded as failed for it."""


class TritonModel:
    """What :class:`BatchEmbedder` needs of an ``Embedder``, with the model behind a Triton server."""

    def __init__(self, manifest: Any, url: str, model: str, limits: Any = None, retry_window_s: float = RETRY_WINDOW_S):
        self.retry_window_s = retry_window_s
        try:
            import tritonclient.http as httpclient
        except ImportError:
            raise BgevlError("--triton needs tritonclient: pip install 'bgevl-export[serving]'") from None
        from bgevl.core.preprocessing import DEFAULT_LIMITS

        family = get_family(manifest.family)
        self.family, self.model, self.url = family, model, url
        self.open_preprocessor = functools.partial(family.open_preprocessor, manifest.processor_dir, manifest.recipe,
                                                   manifest.max_text_length, limits or DEFAULT_LIMITS)
        self.preprocessor = self.open_preprocessor()
        self.max_batch = items_per_step(manifest.graph_specs())
        self.dim = manifest.embedding_dim
        self.client = httpclient.InferenceServerClient(url.split("://", 1)[-1])
        self.httpclient = httpclient
        try:
            ready = self.client.is_model_ready(model)
        except Exception as exc:  # the client raises its own exception types, and socket errors
            raise BgevlError(f"--triton {url}: cannot reach the server ({reason_of(exc)}); start it with "
                             f"`bgevl-serve REPOSITORY` or check the URL") from None
        if not ready:
            raise BgevlError(f"--triton {url}: model {model!r} is not ready on the server; check --triton-model")

    def _ready(self) -> bool:
        try:
            return bool(self.client.is_model_ready(self.model))
        except Exception:  # noqa: BLE001 - the client raises its own exception types, and socket errors
            return False

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """``EMBEDDING`` of one request. The server's refusal of an item (INVALID_ARG, HTTP 400), or an error of
        a server whose model is ready, is an :class:`InputError` (the caller finds the items); an unreachable
        server or a model that is not ready is retried with backoff, then :class:`ServerUnavailable`."""
        from tritonclient.utils import InferenceServerException

        inputs = []
        for name, values in feeds.items():
            tensor = self.httpclient.InferInput(name, list(values.shape), "BYTES")
            tensor.set_data_from_numpy(values)
            inputs.append(tensor)
        start, delay = time.monotonic(), 0.05
        while True:
            try:
                return np.asarray(self.client.infer(self.model, inputs).as_numpy(SERVING_EMBEDDING), np.float32)
            except InferenceServerException as exc:
                error: Exception = exc
                if str(exc.status()) == "400" or self._ready():
                    raise InputError(f"the server refused it: {reason_of(exc)}") from None
            except OSError as exc:  # connection refused or reset: the server is restarting or gone
                error = exc
            waited = time.monotonic() - start
            if waited >= self.retry_window_s:
                raise ServerUnavailable(
                    f"--triton {self.url}: the server has not answered for {waited:.0f} s ({reason_of(error)}); "
                    f"complete partitions are kept: run the same command to resume once model {self.model!r} is "
                    f"ready") from None
            time.sleep(min(delay, max(0.0, self.retry_window_s - waited)))
            delay = min(2 * delay, 2.0)


class TritonBatchEmbedder(BatchEmbedder):
    """:class:`BatchEmbedder` whose feeds are the entry model's BYTES inputs (encoded images, UTF-8 texts)."""

    def _load(self, item: Any, pre: Any) -> tuple[Any, str | None]:
        image, text = super()._load(item, pre)  # decoded once to check it; the bytes are what is sent
        if image is not None:
            image = item.image if item.image is not None else self._read(item.image_uri)
        return image, text

    def _feeds(self, pre: Any, images: list, texts: list) -> dict[str, Any]:
        serving = set(self.embedder.family.serving_inputs)
        feeds = {}
        for kind in self.kinds:
            with_images, with_texts = kind in (IMAGE, COMPOSED), kind in (TEXT, COMPOSED)
            if with_texts:  # empty, too long, not Unicode: refused here, item by item
                pre.check(Request(None, texts, self.role, self.instruction))
            n = len(images if with_images else texts)
            inputs = {}
            if with_texts:
                inputs[SERVING_TEXT] = np.array([t.encode() for t in texts], dtype=object).reshape(-1, 1)
            if with_images:
                inputs[SERVING_IMAGE] = np.array(list(images), dtype=object).reshape(-1, 1)
            for name, value in ((SERVING_ROLE, self.role), (SERVING_INSTRUCTION, self.instruction)):
                if value is not None and name in serving:
                    inputs[name] = np.array([value.encode()] * n, dtype=object).reshape(-1, 1)
            feeds[kind] = inputs
        return feeds

    def run(self, result: BatchResult) -> BatchResult:
        parts, result.parts = result.parts, []
        for items, texts, feeds in parts:
            try:
                vectors = {kind: self.embedder.run(feeds[kind]) for kind in self.kinds}
            except InputError:  # the server refused the request: find the items it refuses, send the others
                keep = []
                for i, item in enumerate(items):
                    try:
                        for kind in self.kinds:
                            self.embedder.run({k: v[i:i + 1] for k, v in feeds[kind].items()})
                        keep.append(i)
                    except InputError as exc:
                        result.failed.append((item, reason_of(exc)))
                if not keep:
                    continue
                items, texts = [items[i] for i in keep], [texts[i] for i in keep]
                feeds = {kind: {k: v[keep] for k, v in f.items()} for kind, f in feeds.items()}
                vectors = {kind: self.embedder.run(feeds[kind]) for kind in self.kinds}
            result.items.extend(items)
            result.texts.extend(texts)
            for kind in self.kinds:
                result.vectors[kind].append(vectors[kind])
        return result
