"""Corpus inputs: a folder of images, a text file, a table, WebDataset tar shards; local or through fsspec.

Every reader yields :class:`Item` in one deterministic order (sorted paths, table row order, sorted
shards and each tar's member order), so the N-th item is the same on every run of the same command
and partitions can be resumed by position. Readers never decode: an item carries its encoded image
bytes, or the URI a decode worker reads them from, and its text; decoding belongs to the model's
preprocessor (``Preprocessor.decode_image``), in the pipeline's worker threads.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import stat
import tarfile
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterator

from bgevl.core.errors import BgevlError, InputError
from bgevl.core.family import IMAGE, TEXT

#: image file extensions of a folder input and of WebDataset samples (img2dataset writes jpg, png or webp)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
TABLE_FORMATS = {".csv": "csv", ".jsonl": "json", ".ndjson": "json", ".json": "json", ".parquet": "parquet"}
INPUT_FORMATS = ("auto", "folder", "text", "table", "webdataset")


@dataclass
class Item:
    """One corpus item. ``image``: the encoded bytes, or ``image_uri`` for the decode worker to read;
    ``text``: a caption or document text; ``metadata``: the input's other columns."""

    id: str
    source: str
    image: bytes | None = None
    image_uri: str | None = None
    text: str | None = None
    #: a sidecar text file a worker reads (folder input)
    text_uri: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    #: why the reader could not produce it (an unreadable rest of a shard): it goes to the failures as is
    error: str | None = None

    @property
    def has_image(self) -> bool:
        return self.image is not None or self.image_uri is not None

    @property
    def has_text(self) -> bool:
        return self.text is not None or self.text_uri is not None


def url_to_fs(url: str) -> tuple[Any, str]:
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise BgevlError(f"{url}: {exc}; install the fsspec implementation of that scheme (s3fs, gcsfs, adlfs, ...)") from None


#: the largest file or shard member read as one item (a 40 M-pixel image is well under it); a larger one, a
#: device (/dev/zero) or a FIFO is an item failure, never a read without end or a MemoryError
MAX_FILE_BYTES = 256 * 1024 * 1024


def read_bytes(fs: Any, path: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """One item's file, refused (``InputError``: the item's failure) when it is not a regular file or is
    over ``limit`` bytes; at most ``limit + 1`` bytes are read whatever its size claims."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        try:
            info = os.stat(path)
        except OSError as exc:
            raise InputError(f"cannot read {path} ({exc.strerror or exc})") from None
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"{path} is not a regular file (a device, FIFO, socket or folder); name image files only")
        size: int | None = info.st_size
    else:
        try:
            size = fs.size(path)
        except (OSError, NotImplementedError, ValueError):  # a store that cannot tell (an HTTP server without
            size = None  # Content-Length): the bounded read below refuses it all the same
    if size is not None and size > limit:
        raise InputError(f"{path} is {size} bytes, over the {limit}-byte limit of one item")
    with fs.open(path, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise InputError(f"{path} is over the {limit}-byte limit of one item")
    return data


class Source(ABC):
    """An input: ``kinds`` it can provide, ``count`` (None when unknown before reading), ``describe()``
    for the output's manifest, iteration over :class:`Item`."""

    format: str
    count: int | None = None
    #: the kinds of item the input holds (image, text), for ``--kinds auto``
    available: tuple[str, ...] = ()
    #: metadata columns in output order, with their Arrow types where the input has them (None: inferred)
    metadata_schema: Any = None

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What the input is, for the output's manifest (a resumed job must name the same input)."""

    @abstractmethod
    def __iter__(self) -> Iterator[Item]:
        """The input's items, in a stable order (partitions are resumed by position)."""


class FolderSource(Source):
    """Image files found recursively under a folder, sorted by relative path; ``<stem>.txt`` beside an
    image is its caption. The id is the path relative to the folder (unique, extension included)."""

    format = "folder"
    count: int  # known: the files are listed first

    def __init__(self, url: str):
        self.url = url
        self.fs, self.root = url_to_fs(url)
        self.root = self.root.rstrip("/")
        files = sorted(self.fs.find(self.root))
        names = set(files)
        self.images = [p for p in files if p.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS]
        if not self.images:
            raise BgevlError(f"{url}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder or below; "
                             f"point --input at a folder of images, a text file, a table or .tar shards")
        self.captions = {p: p.rsplit(".", 1)[0] + ".txt" for p in self.images}
        self.captions = {p: t for p, t in self.captions.items() if t in names}
        self.count = len(self.images)
        self.available = (IMAGE, TEXT) if len(self.captions) == len(self.images) else (IMAGE,)
        self.with_captions = len(self.captions)

    def _uri(self, path: str) -> str:
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return path if protocol in ("file", "local") else f"{protocol}://{path}"

    def describe(self) -> dict[str, Any]:
        return {"format": self.format, "path": self.url, "items": self.count, "with_captions": self.with_captions}

    def __iter__(self) -> Iterator[Item]:
        for path in self.images:
            caption = self.captions.get(path)
            yield Item(id=posixpath.relpath(path, self.root), source=self._uri(path), image_uri=self._uri(path),
                       text_uri=self._uri(caption) if caption else None)


class TextSource(Source):
    """A text file, one text per line; the id is the line number (1-based)."""

    format = "text"
    available = (TEXT,)

    def __init__(self, url: str):
        self.url = url
        fs, path = url_to_fs(url)
        try:
            raw = read_bytes(fs, path)
        except OSError as exc:
            raise BgevlError(f"{url}: cannot read it ({exc})") from None
        try:
            self.lines = raw.decode("utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise BgevlError(f"{url}: not UTF-8 text ({exc.reason} at byte {exc.start}); re-encode it as UTF-8") from None
        self.count = len(self.lines)

    def describe(self) -> dict[str, Any]:
        return {"format": self.format, "path": self.url, "items": self.count}

    def __iter__(self) -> Iterator[Item]:
        for number, line in enumerate(self.lines, 1):
            yield Item(id=str(number), source=f"{self.url}:{number}", text=line)


class TableSource(Source):
    """CSV, JSON Lines or Parquet with an id column and an image column (a path, relative to the table's
    folder, a URI, or the image bytes) and/or a text column; the other columns are carried as metadata."""

    format = "table"

    def __init__(self, url: str, id_column: str = "id", image_column: str = "image", text_column: str = "text"):
        import pyarrow as pa
        import pyarrow.compute as pc

        self.url = url
        fs, path = url_to_fs(url)
        kind = next((f for ext, f in TABLE_FORMATS.items() if path.lower().endswith(ext)), None)
        try:
            with fs.open(path, "rb") as fh:
                if kind == "parquet":
                    import pyarrow.parquet as pq

                    table = pq.read_table(fh)
                elif kind == "csv":
                    import pyarrow.csv as pcsv

                    # ids and texts stay strings whatever they look like ("007" is not 7)
                    table = pcsv.read_csv(fh, convert_options=pcsv.ConvertOptions(
                        column_types={c: pa.string() for c in (id_column, image_column, text_column)}))
                else:
                    import pyarrow.json as pjson

                    table = pjson.read_json(fh)
        except (OSError, pa.ArrowInvalid) as exc:
            raise BgevlError(f"{url}: cannot read it as {kind} ({str(exc).splitlines()[0]}); check the file") from None
        columns = table.column_names
        if id_column not in columns:
            raise BgevlError(f"{url}: no id column {id_column!r} (columns: {', '.join(columns)}); name it with --id-column")
        if image_column not in columns and text_column not in columns:
            raise BgevlError(f"{url}: neither an image column {image_column!r} nor a text column {text_column!r} "
                             f"(columns: {', '.join(columns)}); name them with --image-column / --text-column")
        ids = table.column(id_column)
        if ids.null_count:
            raise BgevlError(f"{url}: {ids.null_count} rows have no {id_column!r}; every row needs a unique id")
        ids = pc.cast(ids, pa.string())
        counts = pc.value_counts(ids)
        repeated = pc.filter(counts, pc.greater(counts.field("counts"), 1))
        if len(repeated):
            first = repeated[0].as_py()
            raise BgevlError(f"{url}: {len(repeated)} ids occur more than once (e.g. {first['values']!r}, "
                             f"{first['counts']} times); ids must be unique: fix the {id_column!r} column")
        self.ids = ids.to_pylist()
        self.base = posixpath.dirname(path)
        self.fs = fs
        self.image_column = image_column if image_column in columns else None
        self.text_column = text_column if text_column in columns else None
        self.available = tuple(k for k, c in ((IMAGE, self.image_column), (TEXT, self.text_column)) if c)
        self.extra = [c for c in columns if c not in (id_column, image_column, text_column)]
        self.metadata_schema = pa.schema([table.schema.field(c) for c in self.extra])
        self.table = table
        self.count = table.num_rows

    def describe(self) -> dict[str, Any]:
        return {"format": self.format, "path": self.url, "items": self.count, "image_column": self.image_column,
                "text_column": self.text_column}

    def _image(self, value: Any) -> dict[str, Any]:
        if isinstance(value, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        if value is None:
            return {}
        if isinstance(value, bytes):
            return {"image": value}
        value = str(value)
        if "://" not in value and not posixpath.isabs(value):
            value = posixpath.join(self.base, value)
            protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
            if protocol not in ("file", "local"):
                value = f"{protocol}://{value}"
        return {"image_uri": value}

    def __iter__(self) -> Iterator[Item]:
        index = 0
        for batch in self.table.to_batches(max_chunksize=4096):
            rows = batch.to_pylist()
            for row in rows:
                image = self._image(row.get(self.image_column)) if self.image_column else {}
                text = row.get(self.text_column) if self.text_column else None
                source = image.get("image_uri") or f"{self.url}#row={index}"
                yield Item(id=self.ids[index], source=source, text=None if text is None else str(text),
                           metadata={c: row[c] for c in self.extra}, **image)
                index += 1


def expand_braces(pattern: str) -> list[str]:
    """``shards/{00000..00099}.tar`` -> 100 names, zero padding kept (img2dataset's and webdataset's shard
    notation; numeric ranges only, one level: the ``braceexpand`` package is not a dependency)."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not match:
        return [pattern]
    lo, hi = match.group(1), match.group(2)
    width = len(lo) if lo.startswith("0") else 0
    return [name for n in range(int(lo), int(hi) + 1)
            for name in expand_braces(pattern[:match.start()] + str(n).zfill(width) + pattern[match.end():])]


class WebDatasetSource(Source):
    """WebDataset tar shards as img2dataset writes them: per sample ``<key>.jpg`` (or png, webp) with
    ``<key>.txt`` (caption) and ``<key>.json`` (metadata). The id is the sample key. Read with the
    standard library's streaming tar reader, shard after shard, sample after sample (the ``webdataset``
    package is not a dependency; grouping follows its rule: the key is the member name up to the first
    dot of its base name)."""

    format = "webdataset"

    def __init__(self, url: str):
        self.url = url
        fs, path = url_to_fs(url)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        prefix = "" if protocol in ("file", "local") else f"{protocol}://"
        if fs.isdir(path):
            shards = sorted(p for p in fs.find(path) if p.endswith(".tar"))
        else:
            shards = []
            for name in expand_braces(path):
                shards.extend(sorted(fs.glob(name)) if any(c in name for c in "*?[") else [name])
            missing = [s for s in shards if not fs.exists(s)]
            if missing:
                raise BgevlError(f"{url}: {len(missing)} shard(s) not found, e.g. {prefix}{missing[0]}; check the path")
        if not shards:
            raise BgevlError(f"{url}: no .tar shards found; give a folder of shards, a shard, a glob or {{00000..00009}}.tar")
        self.fs, self.shards, self.prefix = fs, shards, prefix
        self.available = (IMAGE, TEXT)
        self.count = self._count_from_stats()

    def _count_from_stats(self) -> int | None:
        """img2dataset's ``<shard>_stats.json`` give each shard's sample count ("successes"), for the
        progress bar's total; None when any is missing."""
        total = 0
        for shard in self.shards:
            stats = shard[:-4] + "_stats.json"
            try:
                total += int(json.loads(read_bytes(self.fs, stats))["successes"])
            except (OSError, ValueError, KeyError, TypeError):
                return None
        return total

    def describe(self) -> dict[str, Any]:
        return {"format": self.format, "path": self.url, "shards": [self.prefix + s for s in self.shards]}

    def __iter__(self) -> Iterator[Item]:
        for shard in self.shards:
            yield from self._samples(shard)

    def _samples(self, shard: str) -> Iterator[Item]:
        url = self.prefix + shard
        key = None
        try:
            with self.fs.open(shard, "rb") as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
                key, files, oversize = None, {}, []
                for member in tar:
                    if not member.isfile():
                        continue
                    directory, base = posixpath.split(member.name)
                    if "." not in base:
                        continue
                    stem, ext = base.split(".", 1)
                    sample = posixpath.join(directory, stem)
                    if sample != key and key is not None:
                        yield self._item(url, key, files, oversize)
                        files, oversize = {}, []
                    key = sample
                    if member.size > MAX_FILE_BYTES:  # a declared size is not read into memory (a sparse 16 GiB)
                        oversize.append(f"{base} declares {member.size} bytes, over the {MAX_FILE_BYTES}-byte limit "
                                        f"of one item")
                        continue
                    extracted = tar.extractfile(member)
                    assert extracted is not None  # a regular file (member.isfile() above)
                    files[ext.lower()] = extracted.read()
                if key is not None:
                    yield self._item(url, key, files, oversize)
        except (OSError, tarfile.TarError, EOFError, MemoryError) as exc:  # the shard's failure is its own: the next one is read
            yield Item(id=url, source=url, error=f"shard unreadable after sample {key!r}: {exc}; the rest of this "
                       f"shard was not embedded: replace the shard and embed it into a new --output")

    def _item(self, url: str, key: str, files: dict[str, bytes], oversize: list[str] | None = None) -> Item:
        if oversize:
            return Item(id=key, source=f"{url}#{key}", error="; ".join(oversize))
        image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
        text = files.get("txt")
        metadata: dict[str, Any] = {}
        if "json" in files:
            try:
                parsed = json.loads(files["json"])
                if isinstance(parsed, dict):  # flattened one level as clip-retrieval's json_normalize; nested as JSON
                    metadata = {k: v if not isinstance(v, (dict, list)) else json.dumps(v) for k, v in parsed.items()
                                if k not in ("id", "image_path", "caption")}
            except ValueError:
                pass
        return Item(id=key, source=f"{url}#{key}", image=image, text=None if text is None else
                    text.decode("utf-8", errors="replace"), metadata=metadata)


def open_source(url: str, input_format: str = "auto", id_column: str = "id", image_column: str = "image",
                text_column: str = "text") -> Source:
    """The reader of ``url``: ``input_format`` or, with ``auto``, by what it is: a folder of .tar files,
    .tar shards (a file, a glob, a ``{00000..00009}`` range) -> webdataset; another folder -> images;
    .csv/.jsonl/.json/.parquet -> table; any other file -> one text per line."""
    if "://" not in url:  # a local path: recorded absolute, so a resume from another folder is the same job
        url = os.path.abspath(os.path.expanduser(url))
    if input_format not in INPUT_FORMATS:
        raise BgevlError(f"--input-format {input_format!r}: choose one of {', '.join(INPUT_FORMATS)}")
    if input_format == "auto":
        fs, path = url_to_fs(url)
        lower = path.lower()
        if lower.endswith(".tar") or ("{" in path and ".." in path):
            input_format = "webdataset"
        elif any(lower.endswith(ext) for ext in TABLE_FORMATS):
            input_format = "table"
        elif fs.isdir(path):
            input_format = "webdataset" if any(p.endswith(".tar") for p in fs.ls(path, detail=False)) else "folder"
        elif fs.exists(path):
            input_format = "text"
        else:
            raise BgevlError(f"--input {url}: not found; give a folder of images, a text file, a table "
                             f"(.csv, .jsonl, .parquet) or WebDataset .tar shards")
    if input_format == "folder":
        return FolderSource(url)
    if input_format == "text":
        return TextSource(url)
    if input_format == "table":
        return TableSource(url, id_column, image_column, text_column)
    return WebDatasetSource(url)
