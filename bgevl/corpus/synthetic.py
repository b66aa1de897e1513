"""Generated corpora for tests and ``bgevl-bench``: small distinct images with captions, written as a folder,
a table and WebDataset shards (img2dataset's layout), with corrupt, empty and decompression-bomb images
among them where asked."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "gray", "cyan")
BAD_KINDS = ("corrupt", "empty", "bomb")


@dataclass
class CorpusItem:
    key: str
    data: bytes
    caption: str
    bad: str | None = None  # None, or one of BAD_KINDS


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` pixels (400 M by default) with almost no data: the
    header check must refuse it before anything is decoded."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def image_bytes(index: int, size: int = 48, fmt: str = "JPEG") -> bytes:
    """A distinct image: a seeded color field with a block whose place and color depend on ``index``."""
    from PIL import Image

    rng = np.random.default_rng(index)
    pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    pixels[: size // 2, : size // 2] = rng.integers(0, 256, size=3, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, quality=92) if fmt == "JPEG" else \
        Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def make_items(count: int, bad_every: int = 0, size: int = 48) -> list[CorpusItem]:
    """``count`` items; every ``bad_every``-th one (if > 0) is corrupt, empty or a bomb in turn."""
    items = []
    for i in range(count):
        caption = f"item {i}: a {COLORS[i % len(COLORS)]} square, pattern {i * 7919 % 10007}"
        data, bad = image_bytes(i, size), None
        if bad_every and i % bad_every == bad_every - 1:
            bad = BAD_KINDS[(i // bad_every) % len(BAD_KINDS)]
            data = {"corrupt": data[: len(data) // 2], "empty": b"", "bomb": bomb_png()}[bad]
        items.append(CorpusItem(f"{i:06d}", data, caption, bad))
    return items


def write_folder(root: Path, items: list[CorpusItem], subfolders: int = 4) -> Path:
    """``root/dNN/<key>.jpg`` with ``<key>.txt`` captions beside them."""
    for i, item in enumerate(items):
        folder = root / f"d{i % subfolders:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{item.key}.jpg").write_bytes(item.data)
        (folder / f"{item.key}.txt").write_text(item.caption)
    return root


def write_table(path: Path, items: list[CorpusItem], image_dir: str = "images") -> Path:
    """A table (format from the suffix: .csv, .jsonl, .parquet) with ``id``, ``image`` (a path relative to the
    table), ``text`` and a metadata column ``shade``; the images under ``image_dir`` beside it."""
    import pyarrow as pa

    (path.parent / image_dir).mkdir(parents=True, exist_ok=True)
    for item in items:
        (path.parent / image_dir / f"{item.key}.jpg").write_bytes(item.data)
    rows: dict[str, list[Any]] = {
        "id": [f"row-{item.key}" for item in items], "image": [f"{image_dir}/{item.key}.jpg" for item in items],
        "text": [item.caption for item in items], "shade": [i % 5 for i in range(len(items))]}
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        pq.write_table(pa.table(rows), path)
    elif path.suffix == ".csv":
        import pyarrow.csv as pcsv

        pcsv.write_csv(pa.table(rows), path)
    else:
        path.write_text("".join(json.dumps({k: v[i] for k, v in rows.items()}) + "\n" for i in range(len(items))))
    return path


def write_shards(root: Path, items: list[CorpusItem], per_shard: int = 1000) -> list[Path]:
    """img2dataset's webdataset output: ``NNNNN.tar`` with ``<key>.jpg``, ``<key>.txt``, ``<key>.json`` per sample
    (key = 5-digit shard and 4-digit index), ``NNNNN_stats.json`` with the sample count."""
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for shard, start in enumerate(range(0, len(items), per_shard)):
        path = root / f"{shard:05d}.tar"
        chunk = items[start:start + per_shard]
        with tarfile.open(path, "w") as tar:
            for index, item in enumerate(chunk):
                key = f"{shard:05d}{index:04d}"
                meta = {"url": f"https://example.com/{item.key}.jpg", "caption": item.caption, "key": key,
                        "status": "success", "width": 48, "height": 48}
                for ext, body in (("jpg", item.data), ("txt", item.caption.encode()), ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(body)
                    tar.addfile(info, io.BytesIO(body))
        (root / f"{shard:05d}_stats.json").write_text(json.dumps({"count": len(chunk), "successes": len(chunk)}))
        shards.append(path)
    return shards
