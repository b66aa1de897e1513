"""The output folder: clip-retrieval's layout, a Parquet ``id, embedding`` table, failures, ``manifest.json``.

::

    OUT/img_emb/img_emb_00000.npy            # [n, dim] float32 (or --embedding-dtype's type), L2-normalized, one per partition
    OUT/text_emb/text_emb_00000.npy          # captions / texts, same rows
    OUT/composed_emb/composed_emb_00000.npy  # image+text items
    OUT/metadata/metadata_00000.parquet      # id, image_path, caption, the input's metadata columns: same rows
    OUT/embeddings/part_00000.parquet        # id, embedding (one kind) or id, <kind>_embedding (several)
    OUT/failures/failures_00000.parquet      # id, source, reason: items that could not be embedded
    OUT/manifest.json                        # export, input, options, partitions, counts
    OUT/embedding_ranges.json                # int8/uint8: the export's calibration ranges the vectors were quantized with

Row *i* of ``metadata_N`` is row *i* of every ``*_emb_N.npy`` (clip-retrieval's positional join; its
``clip index`` / autofaiss read ``img_emb`` and ``text_emb`` unchanged). Partition numbers are
zero-padded to a fixed 5 digits, so sorted paths are in partition order (embedding-reader sorts them)
whatever the number of partitions. A partition with no embedded item writes no ``.npy``/metadata
(as clip-retrieval's writer skips empty batches).

Each file is written under a temporary name and renamed; a partition counts as done only once
``manifest.json`` (replaced the same way, last) lists it, so a job killed at any point and run again
redoes exactly the partitions the manifest does not list, and every input id ends up once, in an
embedding row or a failure row.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bgevl.core.compact import RANGES_FILE, quantize
from bgevl.core.errors import BgevlError
from bgevl.core.family import COMPOSED, IMAGE, TEXT
from bgevl.corpus.readers import url_to_fs

FORMAT = "bgevl-corpus/1"
MANIFEST = "manifest.json"
#: kind -> (folder, file prefix): clip-retrieval's names for images and texts
FOLDERS: dict[str, tuple[str, str]] = {IMAGE: ("img_emb", "img_emb"), TEXT: ("text_emb", "text_emb"), COMPOSED: ("composed_emb", "composed_emb")}
PAD = 5
PARTIAL = ".partial"


def partition_name(number: int) -> str:
    if number >= 10 ** PAD:
        raise BgevlError(f"partition {number}: over {10 ** PAD} partitions; raise --partition-size")
    return str(number).zfill(PAD)


@dataclass
class Partition:
    """What one partition holds once embedded: rows in input order, and the failures."""

    number: int
    ids: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    captions: list[str | None] = field(default_factory=list)
    metadata: list[dict[str, Any]] = field(default_factory=list)
    vectors: dict[str, list[np.ndarray]] = field(default_factory=dict)
    failures: list[tuple[str, str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


def utf8(values: Any) -> list[Any]:
    """Strings as Parquet can store them: a file name that is not valid UTF-8 (Python keeps its bytes as
    surrogate escapes, which UTF-8 cannot encode) is written with those bytes as ``\\xNN`` escapes, so one
    such name does not stop the job; None stays None."""
    out = []
    for value in values:
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                value = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        out.append(value)
    return out


def _describe_mismatch(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return "; ".join(f"{k}: {json.dumps(old.get(k))} there, {json.dumps(new.get(k))} now" for k in keys)


def _metadata_table(rows: list[dict[str, Any]], schema: Any) -> Any:
    """The metadata columns of a partition: the input's types (a table), else inferred over the rows (a shard's
    .json, whose keys and types may vary from sample to sample: values of mixed types are stored as text)."""
    import pyarrow as pa

    if schema is not None:
        return pa.Table.from_pylist(rows, schema=schema)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    arrays = {}
    for column in columns:
        values = [row.get(column) for row in rows]
        try:
            arrays[column] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arrays[column] = pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v) for v in values],
                                      pa.string())
    return pa.table(arrays)


class CorpusOutput:
    """One output folder (a local path or an fsspec URL). ``identity``: what must match to resume into it
    (model, precision, kinds, role, instruction, dtype, partition size, the input); anything else is refused."""

    def __init__(self, url: str, identity: dict[str, Any], info: dict[str, Any], kinds: list[str],
                 captions: bool, images: bool, metadata_schema: Any = None, dtype: str = "float32",
                 ranges: Any = None):
        """``dtype``: an output type of ``bgevl.core.compact`` (int8/uint8 with the export's ``ranges``)."""
        self.url = url
        self.fs, self.root = url_to_fs(url)
        self.root = self.root.rstrip("/")
        self.identity, self.kinds, self.dtype, self.ranges = identity, kinds, dtype, ranges
        self.captions, self.images, self.metadata_schema = captions, images, metadata_schema
        self.done: dict[int, dict[str, Any]] = {}
        existing = self._path(MANIFEST)
        if self.fs.exists(existing):
            try:
                old = json.loads(self.fs.cat_file(existing))
            except ValueError as exc:
                raise BgevlError(f"{url}/{MANIFEST} is not valid JSON ({exc}); choose another --output") from None
            if old.get("format") != FORMAT:
                raise BgevlError(f"{url} holds a {MANIFEST} that is not a bgevl-embed output; choose another --output")
            if old.get("identity") != identity:
                raise BgevlError(f"--output {url} holds embeddings made differently ({_describe_mismatch(old.get('identity') or {}, identity)}); "
                                 f"they are not mixed: choose another --output, or delete {url} to start over")
            self.done = {int(p["number"]): p for p in old.get("partitions", [])}
            self.created = old.get("created")
        elif self.fs.isdir(self.root) and self.fs.ls(self.root, detail=False):
            raise BgevlError(f"--output {url} is not empty and holds no {MANIFEST} of bgevl-embed; choose an empty or new folder")
        else:
            self.created = None
        self.info = info
        self.fs.makedirs(self.root, exist_ok=True)
        self.save(complete=False)  # first: a folder with our manifest is ours to resume, whenever the job stops
        for folder in [FOLDERS[k][0] for k in kinds] + ["metadata", "embeddings", "failures"]:
            self.fs.makedirs(self._path(folder), exist_ok=True)
            # a killed run's temporary files, listed (a glob would read the user's --output as a pattern:
            # 'g[1]' matched the sibling folder g1/)
            for leftover in self.fs.ls(self._path(folder), detail=False):
                name = leftover.rstrip("/").rsplit("/", 1)[-1]
                if name.startswith(".") and name.endswith(PARTIAL):
                    self.fs.rm(leftover)

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _write(self, relative: str, data: bytes) -> None:
        """``data`` under a temporary name, then renamed (atomic on a local filesystem; on object storage
        each file is one upload, never seen half-written)."""
        folder, name = relative.rsplit("/", 1) if "/" in relative else ("", relative)
        partial = self._path(*(p for p in (folder, f".{name}{PARTIAL}") if p))
        with self.fs.open(partial, "wb") as fh:
            fh.write(data)
        self.fs.mv(partial, self._path(relative))

    def _parquet(self, table: Any) -> bytes:
        import pyarrow.parquet as pq

        sink = io.BytesIO()
        pq.write_table(table, sink)
        return sink.getvalue()

    def write(self, part: Partition, items: int) -> dict[str, Any]:
        """Write a finished partition (``items``: how many input items it covered) and record it."""
        import pyarrow as pa

        name = partition_name(part.number)
        files = []
        n = len(part)
        if n:
            arrays = {kind: quantize(np.concatenate(part.vectors[kind]), self.dtype, self.ranges) for kind in self.kinds}
            for kind, array in arrays.items():
                folder, prefix = FOLDERS[kind]
                sink = io.BytesIO()
                np.save(sink, array)
                files.append(f"{folder}/{prefix}_{name}.npy")
                self._write(files[-1], sink.getvalue())
            columns: dict[str, Any] = {"id": pa.array(utf8(part.ids), pa.string())}
            if self.images:
                columns["image_path"] = pa.array(utf8(part.sources), pa.string())
            if self.captions:
                columns["caption"] = pa.array(utf8(part.captions), pa.string())
            meta = _metadata_table(part.metadata, self.metadata_schema) if part.metadata and \
                (self.metadata_schema is not None or any(part.metadata)) else None
            if meta is not None:
                for column in meta.column_names:
                    if column not in columns:
                        values = meta.column(column)
                        columns[column] = values.cast(pa.string()) if pa.types.is_null(values.type) else values
            files.append(f"metadata/metadata_{name}.parquet")
            self._write(files[-1], self._parquet(pa.table(columns)))
            table = {"id": columns["id"]}
            for kind, array in arrays.items():
                column = "embedding" if len(arrays) == 1 else f"{kind}_embedding"
                values = pa.array(array.reshape(-1), pa.from_numpy_dtype(array.dtype))
                table[column] = pa.FixedSizeListArray.from_arrays(values, array.shape[1])
            files.append(f"embeddings/part_{name}.parquet")
            self._write(files[-1], self._parquet(pa.table(table)))
        if part.failures:
            ids, sources, reasons = zip(*part.failures)
            files.append(f"failures/failures_{name}.parquet")
            self._write(files[-1], self._parquet(pa.table({"id": pa.array(utf8(ids), pa.string()),
                                                           "source": pa.array(utf8(sources), pa.string()),
                                                           "reason": pa.array(utf8(reasons), pa.string())})))
        record = {"number": part.number, "items": items, "embedded": n, "failed": len(part.failures),
                  "first_id": part.ids[0] if n else None, "files": files}
        self.done[part.number] = record
        self.save(complete=False)
        return record

    def counts(self) -> dict[str, int]:
        return {"items": sum(p["items"] for p in self.done.values()),
                "embedded": sum(p["embedded"] for p in self.done.values()),
                "failed": sum(p["failed"] for p in self.done.values()), "partitions": len(self.done)}

    def save(self, complete: bool) -> None:
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.created = self.created or now
        data = {"format": FORMAT, "created": self.created, "updated": now, "complete": complete,
                "identity": self.identity, **self.info, "kinds": self.kinds, "dtype": self.dtype,
                "layout": {kind: f"{FOLDERS[kind][0]}/{FOLDERS[kind][1]}_NNNNN.npy" for kind in self.kinds}
                | {"metadata": "metadata/metadata_NNNNN.parquet", "table": "embeddings/part_NNNNN.parquet",
                   "failures": "failures/failures_NNNNN.parquet"},
                "counts": self.counts(), "partitions": [self.done[k] for k in sorted(self.done)]}
        self._write(MANIFEST, (json.dumps(data, indent=2, default=str) + "\n").encode())
        if self.ranges is not None:  # beside the vectors (after the manifest: a folder is never left without one)
            self._write(RANGES_FILE, self.ranges.dumps().encode())
