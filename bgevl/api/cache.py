"""An in-memory LRU cache of embeddings for ``bgevl-api`` (``--cache-size``), as Marqo's inference cache:
repeated queries are common in search traffic, and an embedding is a pure function of the model, the item and
the parameters that change it.

The key is a SHA-256 over the served model's name, the item's kind, its text and its image bytes, the role,
the task instruction and ``truncate``. The value is the float32 vector as the model computed it (an output type
such as int8 is derived from it after the cache, so it needs no key of its own): a cached answer is the computed one bit for
bit. Bounded in bytes (the vectors' plus a fixed cost per entry), least recently used evicted first; one cache
per server, so never shared across models. Hits, misses, evictions and the bytes held are on ``/metrics``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import numpy as np

#: what an entry costs beside its vector: the key, the dict slot, the array header (measured order of magnitude)
ENTRY_OVERHEAD = 200


class EmbeddingCache:
    """Used from the API's event loop thread only (every ``get`` and ``put``), so it takes no lock. The vectors it
    holds are read-only: a caller copies what it answers with."""

    def __init__(self, max_bytes: int, metrics: Any = None):
        self.max_bytes = max_bytes
        self.held = 0
        self.entries: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.metrics = metrics

    @staticmethod
    def key(model: str, kind: str, text: str | None, image: bytes | None, role: str | None,
            instruction: str | None, truncate: str | None = None) -> bytes:
        digest = hashlib.sha256()
        for part in (model, kind, role or "", instruction if instruction is not None else "\x00none", truncate or ""):
            digest.update(part.encode("utf-8", "surrogatepass") + b"\x00")
        digest.update(b"T" + (text.encode("utf-8", "surrogatepass") if text is not None else b"") + b"\x00")
        digest.update(b"I" + (hashlib.sha256(image).digest() if image is not None else b""))
        return digest.digest()

    def get(self, key: bytes) -> np.ndarray | None:
        vector = self.entries.get(key)
        if vector is None:
            self._count("misses")
            return None
        self.entries.move_to_end(key)
        self._count("hits")
        return vector

    def put(self, key: bytes, vector: np.ndarray) -> None:
        stored = np.array(vector, np.float32, copy=True)
        stored.flags.writeable = False
        cost = stored.nbytes + ENTRY_OVERHEAD
        if cost > self.max_bytes or key in self.entries:
            return
        self.entries[key] = stored
        self.held += cost
        while self.held > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.held -= old.nbytes + ENTRY_OVERHEAD
            self._count("evictions")
        if self.metrics is not None:
            self.metrics.cache_bytes.set(self.held)

    def _count(self, what: str) -> None:
        if self.metrics is not None:
            getattr(self.metrics, f"cache_{what}").inc()


def parse_size(text: str) -> int:
    """``--cache-size``: bytes, or with a K/M/G suffix (powers of 1024): ``512M``, ``2G``; ``0``: no cache."""
    units = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}
    value = text.strip().upper().removesuffix("B")
    scale = units.get(value[-1:], 1)
    number = value[:-1] if value[-1:] in units else value
    try:
        size = int(float(number) * scale)
    except ValueError:
        raise ValueError(f"{text!r}: give bytes or a size such as 512M or 2G") from None
    if size < 0:
        raise ValueError(f"{text!r}: must not be negative")
    return size
