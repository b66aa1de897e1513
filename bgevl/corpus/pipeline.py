"""Embedding a corpus: partitions of items, batches prepared by a pool of threads, the model in one thread.

The plan (:func:`plan`) numbers the input's items in order and cuts them into partitions of
``partition_size`` items and batches of ``batch_size`` inside a partition; partitions the output
already lists are skipped without reading their bytes (a folder's or a table's images are read by
the workers, so skipping one costs nothing; a tar shard is read through). A
:class:`BatchEmbedder` does one batch: reads and decodes each item (``Preprocessor.decode_image``:
the limits are checked on the header first), turns the batch into feeds, runs the model; an item
that cannot be read, decoded or prepared goes to the failures with a one-line reason and the rest of
its batch is embedded. The local engine (:func:`embed_local`) prepares batches in a bounded pool of
threads (Pillow's decoders and resizes and the tokenizers release the GIL) while the main thread runs
inference, so memory stays bounded by the pool's depth whatever the corpus size; the Ray Data engine
(``bgevl.corpus.ray_engine``) runs the same ``BatchEmbedder`` in actors.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, cast

import numpy as np

from bgevl.api.images import FetchPolicy, fetch
from bgevl.core.errors import BgevlError, InputError
from bgevl.core.family import COMPOSED, IMAGE, KINDS, TEXT, Kind, Request, over_budget
from bgevl.corpus.output import CorpusOutput, Partition
from bgevl.corpus.readers import Item, Source, read_bytes, url_to_fs

#: decoded pixels a worker holds before it turns them into feeds (about 200 MB of RGB): a batch of
#: 64 photos of 12 M pixels would otherwise be 2.3 GB per batch in flight
PIXEL_BUDGET = 64_000_000
def reason_of(exc: BaseException) -> str:
    """One line: an item's input error without its batch position (``InputError.reason``), else the message."""
    text = exc.reason if isinstance(exc, InputError) else str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def needs(kinds: list[str]) -> tuple[bool, bool]:
    """(needs an image, needs a text) for the kinds embedded."""
    return any(Kind(k).has_image for k in kinds), any(Kind(k).has_text for k in kinds)


@dataclass
class BatchResult:
    """One batch embedded: the items that made it, in input order, their texts (captions read from
    sidecars included) and vectors per kind; the failures as (item, reason)."""

    items: list[Item] = field(default_factory=list)
    texts: list[str | None] = field(default_factory=list)
    vectors: dict[str, list[np.ndarray]] = field(default_factory=dict)
    failed: list[tuple[Item, str]] = field(default_factory=list)
    #: prepared, not yet run: (items, texts, {kind: feeds})
    parts: list[tuple[list[Item], list[str | None], dict[str, Any]]] = field(default_factory=list)


class BatchEmbedder:
    """Reads, decodes, prepares and embeds batches of :class:`Item` with one ``Embedder``.
    :meth:`prepare` may run in several threads at once (each thread gets its own preprocessor:
    tokenizers are not safe to share); :meth:`run` runs the model."""

    def __init__(self, embedder: Any, kinds: list[str], role: str | None = None, instruction: str | None = None,
                 fetch: FetchPolicy | None = None):
        unknown = [k for k in kinds if k not in KINDS]
        if unknown or not kinds:
            raise BgevlError(f"--kinds {','.join(kinds)}: choose from {', '.join(KINDS)}")
        self.embedder, self.kinds, self.role, self.instruction = embedder, kinds, role, instruction
        #: which http(s) image URLs of the input are fetched (bgevl-embed --allow-image-host), as the API's
        self.fetch = fetch or FetchPolicy()
        self.need_image, self.need_text = needs(kinds)
        self.local = threading.local()
        self.fs_cache: dict[str, Any] = {}
        # the role and instruction are checked once, before any item is read
        self.embedder.preprocessor.check(Request(None, ["x"], role, instruction))

    def preprocessor(self) -> Any:
        pre = getattr(self.local, "pre", None)
        if pre is None:
            opener = self.embedder.open_preprocessor
            pre = self.local.pre = opener() if opener is not None and threading.current_thread() is not threading.main_thread() \
                else self.embedder.preprocessor
        return pre

    def _read(self, uri: str) -> bytes:
        if uri.split("://", 1)[0].lower() in ("http", "https"):
            if not self.fetch.hosts:
                raise InputError("an http(s) image URL: bgevl-embed fetches them only from the hosts given with "
                                 "--allow-image-host HOST ('*': any host whose addresses are public)")
            return fetch(uri, "image", self.fetch)
        fs, path = url_to_fs(uri)
        return read_bytes(fs, path)

    def _load(self, item: Item, pre: Any) -> tuple[Any, str | None]:
        if item.error:
            raise InputError(item.error)
        image = text = None
        if item.text is not None:
            text = item.text
        elif item.text_uri is not None:
            try:
                text = self._read(item.text_uri).decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                raise InputError(f"caption {item.text_uri} is not UTF-8 ({exc.reason}); re-encode it") from None
        if self.need_text and text is None:
            raise InputError("no text (caption) for this item, and the kinds embedded need one; pass --kinds without "
                             "text/composed to embed the images alone")
        if self.need_image:
            if not item.has_image:
                raise InputError("no image for this item, and the kinds embedded need one; pass --kinds text to embed "
                                 "the texts alone")
            # has_image: the bytes or their URI
            data = item.image if item.image is not None else self._read(cast(str, item.image_uri))
            image = pre.decode_image(data, 0)
        return image, text

    def _feeds(self, pre: Any, images: list, texts: list) -> dict[str, Any]:
        feeds = {}
        for kind in self.kinds:
            request = Request(images if kind in (IMAGE, COMPOSED) else None, texts if kind in (TEXT, COMPOSED) else None,
                              self.role, self.instruction)
            feeds[kind] = pre.prepare(pre.admit(request))
        return feeds

    def _flush(self, pending: list, result: BatchResult, pre: Any) -> None:
        if not pending:
            return
        try:
            items, images, texts = map(list, zip(*pending))
            result.parts.append((items, texts, self._feeds(pre, images, texts)))
            return
        except InputError:
            pass
        good = []
        for entry in pending:  # one item refused the whole batch: find it, embed the others
            try:
                self._feeds(pre, [entry[1]], [entry[2]])
                good.append(entry)
            except InputError as exc:
                result.failed.append((entry[0], reason_of(exc)))
        if good:
            items, images, texts = map(list, zip(*good))
            result.parts.append((items, texts, self._feeds(pre, images, texts)))

    def _cost(self, pre: Any, image: Any, text: str | None) -> int:
        """An item's tokens for the preprocessor's token budget (0 where it has none): the costliest of the
        kinds embedded."""
        if pre.token_budget is None:
            return 0
        costs = [pre.item_costs(Request([image] if kind in (IMAGE, COMPOSED) else None,
                                        [text] if kind in (TEXT, COMPOSED) else None, self.role, self.instruction))
                 for kind in self.kinds]
        return max((c[0] for c in costs if c), default=0)

    def prepare(self, batch: list[Item]) -> BatchResult:
        """Read, decode and preprocess a batch; failures are recorded, not raised."""
        pre = self.preprocessor()
        result = BatchResult(vectors={k: [] for k in self.kinds})
        pending: list = []
        pixels = longest = 0
        for item in batch:
            try:
                image, text = self._load(item, pre)
            except InputError as exc:
                result.failed.append((item, reason_of(exc)))
                continue
            except OSError as exc:
                result.failed.append((item, f"cannot read it ({exc.strerror or exc})"))
                continue
            cost = self._cost(pre, image, text)
            if pending and over_budget(len(pending), longest, cost, pre.token_budget):
                self._flush(pending, result, pre)  # items of a varying number of tokens: cut by the family's budget
                pending, pixels, longest = [], 0, 0
            pending.append((item, image, text))
            longest = max(longest, cost)
            size = getattr(image, "size", None)  # a PIL image; the Triton engine keeps the encoded bytes
            pixels += size[0] * size[1] if isinstance(size, tuple) else 0
            if pixels > PIXEL_BUDGET or len(pending) >= self.embedder.max_batch:
                self._flush(pending, result, pre)
                pending, pixels, longest = [], 0, 0
        self._flush(pending, result, pre)
        return result

    def run(self, result: BatchResult) -> BatchResult:
        """Run the model on a prepared batch (in the thread that owns the model)."""
        for items, texts, feeds in result.parts:
            result.items.extend(items)
            result.texts.extend(texts)
            for kind in self.kinds:
                result.vectors[kind].append(self.embedder.run(feeds[kind]))
        result.parts = []
        return result

    def __call__(self, batch: list[Item]) -> BatchResult:
        return self.run(self.prepare(batch))


def plan(source: Source, partition_size: int, batch_size: int, done: set[int],
         on_skip: Callable[[int], None]) -> Iterator[tuple[int, list[Item] | None, int]]:
    """(partition, batch, 0) for each batch to embed, then (partition, None, items in it) when a partition
    ends; partitions in ``done`` are skipped (``on_skip(items)``). Ids seen twice (possible across tar
    shards) become failures of their second occurrence, so the output still has each id once."""
    batch: list[Item]
    number, batch, count = 0, [], 0
    seen: set[str] = set()
    for index, item in enumerate(source):
        part = index // partition_size
        if part != number:
            if batch:
                yield number, batch, 0
            if number not in done:  # a complete partition is kept as it is
                yield number, None, count
            number, batch, count = part, [], 0
        count += 1
        duplicate = item.id in seen
        seen.add(item.id)
        if number in done:
            on_skip(1)
            continue
        if duplicate:
            item = Item(id=item.id, source=item.source, error=f"id {item.id!r} occurs earlier in the input; this "
                        f"occurrence was not embedded")
        batch.append(item)
        if len(batch) >= batch_size:
            yield number, batch, 0
            batch = []
    if count:
        if batch:
            yield number, batch, 0
        if number not in done:
            yield number, None, count


class ItemProgress:
    """A tqdm bar (items/s, ETA, failures) on a terminal; a plain line every ``interval`` seconds otherwise."""

    def __init__(self, total: int | None, interval: float = 30.0, stream: Any = None, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.total, self.interval, self.enabled = total, interval, enabled
        self.done = self.failed = self.skipped = 0
        self.start = self.last = time.monotonic()
        self.bar = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="item", file=self.stream, dynamic_ncols=True, smoothing=0.1)

    def begin(self) -> None:
        """Start the clock (items/s and ETA) here: after the model is loaded."""
        self.start = self.last = time.monotonic()

    def skip(self, n: int) -> None:
        self.skipped += n
        if self.bar is not None:
            self.bar.update(n)

    def update(self, embedded: int, failed: int) -> None:
        self.done += embedded + failed
        self.failed += failed
        if self.bar is not None:
            self.bar.update(embedded + failed)
            self.bar.set_postfix(failed=self.failed, refresh=False)
        elif self.enabled and time.monotonic() - self.last >= self.interval:
            self.last = time.monotonic()
            print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        total = f"/{self.total - self.skipped}" if self.total is not None else ""
        eta = ""
        if self.total is not None and rate > 0:
            left = (self.total - self.skipped - self.done) / rate
            eta = f", ETA {int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}"
        return f"embedded {self.done - self.failed}{total} items ({rate:.1f} items/s{eta}), {self.failed} failed"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class PartitionBuffer:
    """Collects a partition's batch results in order and writes it when it ends."""

    def __init__(self, output: CorpusOutput, kinds: list[str]):
        self.output, self.kinds = output, kinds
        self.parts: dict[int, Partition] = {}

    def add(self, number: int, result: BatchResult) -> None:
        part = self.parts.setdefault(number, Partition(number, vectors={k: [] for k in self.kinds}))
        for item, text in zip(result.items, result.texts):
            part.ids.append(item.id)
            part.sources.append(item.source)
            part.captions.append(text)
            part.metadata.append(item.metadata)
        for kind in self.kinds:
            part.vectors[kind].extend(result.vectors[kind])
        part.failures.extend((item.id, item.source, reason) for item, reason in result.failed)

    def end(self, number: int, items: int) -> dict[str, Any]:
        part = self.parts.pop(number, None)  # (a Partition with no embedded row is falsy: compare with None)
        if part is None:
            part = Partition(number, vectors={k: [] for k in self.kinds})
        return self.output.write(part, items)


def embed_local(source: Source, output: CorpusOutput, embedder: BatchEmbedder, partition_size: int,
                batch_size: int, workers: int, progress: ItemProgress) -> None:
    """The one-machine engine: a producer thread walks the plan and submits batches to ``workers``
    preparing threads; the main thread runs the model on them in order and writes each partition as
    it ends. At most ``2 * workers + 1`` batches are read ahead."""
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="bgevl-prepare")
    ahead: queue.Queue = queue.Queue(maxsize=2 * max(1, workers))
    stop = threading.Event()

    def put(entry: tuple) -> bool:
        while not stop.is_set():
            try:
                ahead.put(entry, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for number, batch, items in plan(source, partition_size, batch_size, set(output.done), progress.skip):
                entry = (number, pool.submit(embedder.prepare, batch), 0) if batch is not None else (number, None, items)
                if not put(entry):
                    return
            put((None, None, 0))
        except BaseException as exc:  # a reader's error ends the job with its message
            put((None, exc, 0))

    producer = threading.Thread(target=produce, name="bgevl-read", daemon=True)
    producer.start()
    buffer = PartitionBuffer(output, embedder.kinds)
    try:
        while True:
            number, work, items = ahead.get()
            if number is None:
                if isinstance(work, BaseException):
                    raise work
                break
            if work is None:
                buffer.end(number, items)
                continue
            result = embedder.run(work.result() if isinstance(work, Future) else work)
            buffer.add(number, result)
            progress.update(len(result.items), len(result.failed))
    finally:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
