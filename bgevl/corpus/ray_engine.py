"""The many-machine engine: Ray Data ``map_batches`` over actors that each hold one ``Embedder``.

The driver walks the same plan as the local engine (partitions in input order, complete ones skipped)
and, per partition, runs ``ray.data.from_items(rows).map_batches(RayEmbedder, compute=ActorPoolStrategy(size=n))``
with order preserved; each actor reads its items' images (files or object storage through fsspec),
decodes, preprocesses and embeds them with the same :class:`~bgevl.corpus.pipeline.BatchEmbedder` as the
local engine, so both give the same vectors and failures. The driver writes the partition (the same
:class:`~bgevl.corpus.output.CorpusOutput`), so resuming, the layout and the manifest are the local
engine's. Ray is the optional ``ray`` extra.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bgevl.core.errors import BgevlError
from bgevl.corpus.pipeline import BatchResult, ItemProgress, PartitionBuffer, plan
from bgevl.corpus.readers import Item

_FIELDS = ("id", "source", "image", "image_uri", "text", "text_uri", "error")


def _value(value: Any, kind: type) -> Any:
    return kind(value) if isinstance(value, (str, bytes, np.str_, np.bytes_)) else None


class RayEmbedder:
    """A Ray Data actor: one Embedder, ``__call__`` on a numpy batch of item rows -> one row per item with
    its vectors (zeros where it failed), text and failure reason ("" when embedded)."""

    def __init__(self, export: str, kinds: list[str], role: str | None, instruction: str | None, load: dict[str, Any],
                 allow_image_hosts: tuple[str, ...] = ()):
        from bgevl.corpus.pipeline import BatchEmbedder
        from bgevl.runtime import Embedder

        self.embedder = Embedder.load(export, **load)
        from bgevl.api.images import FetchPolicy

        self.batcher = BatchEmbedder(self.embedder, kinds, role, instruction,
                                     FetchPolicy(hosts=frozenset(allow_image_hosts)))
        self.kinds = kinds

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["index"])
        # Ray Data hands missing values back as None or NaN, strings as str or numpy str, bytes as bytes
        items = [Item(**{f: _value(batch[f][i], bytes if f == "image" else str) for f in _FIELDS}) for i in range(n)]
        result = self.batcher(items)
        position = {id(item): i for i, item in enumerate(items)}
        reasons = [""] * n
        texts: list[str] = ["-"] * n
        vectors = {kind: np.zeros((n, self.embedder.dim), np.float32) for kind in self.kinds}
        for item, reason in result.failed:
            reasons[position[id(item)]] = reason
        rows = [position[id(item)] for item in result.items]
        for row, text in zip(rows, result.texts):
            texts[row] = "-" if text is None else text
        for kind in self.kinds:
            if rows:
                vectors[kind][rows] = np.concatenate(result.vectors[kind])
        with_text = {row for row, text in zip(rows, result.texts) if text is not None}
        has_text = np.array([row in with_text for row in range(n)])
        # a failure flag beside the reason: Ray Data may hand empty strings back as NaN
        return {"index": np.asarray(batch["index"]), "failed": np.array([bool(r) for r in reasons]),
                "reason": np.array([r or "-" for r in reasons], dtype=object),
                "text": np.array(texts, dtype=object), "has_text": has_text, **{f"v_{k}": v for k, v in vectors.items()}}


def start_ray(address: str, cpus: int) -> Any:
    try:
        import ray
    except ImportError:
        raise BgevlError("--ray-address needs Ray Data: pip install 'bgevl-export[ray]' (or run without --ray-address "
                         "on this machine)") from None
    if not ray.is_initialized():
        if address == "local":
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    return ray


def embed_ray(source: Any, output: Any, options: Any, kinds: list[str], progress: ItemProgress) -> None:
    workers = max(1, options.ray_workers)
    ray = start_ray(options.ray_address, int(max(1, workers * options.ray_cpus_per_worker)))
    from ray.data import ActorPoolStrategy, DataContext

    DataContext.get_current().execution_options.preserve_order = True
    load = {"backend": options.backend, "provider": options.provider,
            "threads": options.threads or max(1, int(options.ray_cpus_per_worker))}
    batch_size = options.batch_size or 32
    buffer = PartitionBuffer(output, kinds)
    rows: list[Item] = []
    for number, batch, items in plan(source, options.partition_size, batch_size, set(output.done), progress.skip):
        if batch is not None:
            rows.extend(batch)
            continue
        if rows:
            table = [{"index": i, **{f: getattr(item, f) for f in _FIELDS}} for i, item in enumerate(rows)]
            dataset = ray.data.from_items(table).map_batches(
                RayEmbedder, batch_size=batch_size, batch_format="numpy",
                compute=ActorPoolStrategy(size=workers), num_cpus=options.ray_cpus_per_worker,
                num_gpus=options.ray_gpus_per_worker or None,
                fn_constructor_kwargs={"export": str(options.export), "kinds": kinds, "role": options.role,
                                       "instruction": options.instruction, "load": load,
                                       "allow_image_hosts": tuple(h.lower().strip() for h in options.allow_image_hosts)})
            result = BatchResult(vectors={k: [] for k in kinds})
            for out in dataset.iter_batches(batch_format="numpy", batch_size=None):
                for j, index in enumerate(out["index"]):
                    item = rows[int(index)]
                    if out["failed"][j]:
                        result.failed.append((item, str(out["reason"][j])))
                        continue
                    result.items.append(item)
                    result.texts.append(str(out["text"][j]) if out["has_text"][j] else None)
                    for kind in kinds:
                        result.vectors[kind].append(np.asarray(out[f"v_{kind}"][j:j + 1], np.float32))
            buffer.add(number, result)
            progress.update(len(result.items), len(result.failed))
            rows = []
        buffer.end(number, items)
