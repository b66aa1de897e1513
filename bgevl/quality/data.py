"""The evaluation data: image-text pairs and composed-retrieval triplets, read with the corpus readers.

* **Pairs** (text->image and image->text retrieval): anything ``bgevl-embed`` reads
  (``bgevl.corpus.readers``): a folder of images with ``<stem>.txt`` captions, a CSV/JSONL/Parquet
  table, WebDataset shards. Several captions per image: one per line of a caption text (COCO's five),
  or, in a table, several rows naming the same image. Images without a caption stay in the gallery as
  distractors of text->image retrieval.
* **Triplets** (composed image retrieval): a JSON array (or JSON Lines) of queries in CIRR's or
  CIRCO's form (reference image, modification text, one or several target images), with a **gallery**
  of images (a folder, a table or shards: anything the readers read) that holds the reference and
  target images. CIRR: ``{"pairid", "reference", "caption", "target_hard"}``; CIRCO:
  ``{"id", "reference_img_id", "relative_caption", "target_img_id", "gt_img_ids"}``.
* A **data directory** (``bgevl-eval --data DIR``, ``bgevl-export --quality-data DIR``) holds
  ``pairs/`` (or ``pairs.csv|jsonl|parquet``, or ``pairs/*.tar``) and/or ``triplets.json`` with
  ``gallery/`` (or ``gallery.csv|jsonl|parquet``); a folder of captioned images alone is pairs.

A malformed file is refused in one line naming it and the fix, before any model is loaded. An item
that cannot be read later (a corrupt image, a caption that is not UTF-8) is an item's failure: it is
left out of every export's evaluation alike and listed in the report.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from bgevl.corpus.readers import Item, TextSource, open_source, read_bytes, url_to_fs
from bgevl.core.errors import BgevlError
from bgevl.core.family import IMAGE

#: keys of a triplet, in order of preference: CIRR's, CIRCO's, then plain names
QUERY_ID_KEYS = ("pairid", "id", "query_id")
REFERENCE_KEYS = ("reference", "reference_img_id", "reference_image", "reference_id")
TEXT_KEYS = ("caption", "relative_caption", "modification", "modification_text", "text")
TARGET_LIST_KEYS = ("gt_img_ids", "targets", "target_ids")
TARGET_KEYS = ("target_hard", "target_img_id", "target", "target_id")
TABLE_SUFFIXES = (".csv", ".jsonl", ".parquet")


@dataclass
class Pairs:
    """Images (each once) and their captions: ``caption_image[j]`` is the index of caption j's image."""

    source: dict[str, Any]
    images: list[Item]
    captions: list[Item]
    caption_image: list[int]
    #: item id -> why it cannot be evaluated (found while reading: a caption that is not UTF-8)
    failures: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {**self.source, "images": len(self.images), "captions": len(self.captions),
                "images_without_caption": len(self.images) - len(set(self.caption_image))}


@dataclass
class Triplets:
    """Composed queries (reference image + modification text) over a gallery of images."""

    source: dict[str, Any]
    queries: list[Item]
    gallery: list[Item]
    #: gallery index of each query's reference image (left out of its ranking, as CIRR does)
    reference: list[int]
    #: gallery indices of each query's targets, the first one first (CIRCO's ``target_img_id``)
    targets: list[list[int]]
    failures: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        counts = [len(t) for t in self.targets]
        return {**self.source, "queries": len(self.queries), "gallery": len(self.gallery),
                "targets_per_query": round(sum(counts) / max(1, len(counts)), 3)}


@dataclass
class QualityData:
    pairs: Pairs | None = None
    triplets: Triplets | None = None
    location: str = ""

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"location": self.location}
        if self.pairs is not None:
            out["pairs"] = self.pairs.describe()
        if self.triplets is not None:
            out["triplets"] = self.triplets.describe()
        return out


def _split_captions(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _image_key(item: Item) -> str:
    """What makes two table rows the same image: its URI, or a digest of its bytes."""
    if item.image_uri is not None:
        return item.image_uri
    return "sha1:" + hashlib.sha1(item.image or b"").hexdigest()


def read_pairs(url: str, input_format: str = "auto", id_column: str = "id", image_column: str = "image",
               text_column: str = "text") -> Pairs:
    """Image-text pairs from anything the corpus readers read (see the module's docstring)."""
    source = open_source(url, input_format, id_column, image_column, text_column)
    if isinstance(source, TextSource) or IMAGE not in source.available:
        raise BgevlError(f"pairs {url}: holds no images ({source.format}); image-text pairs need a folder of images "
                         f"with .txt captions, a table with an image and a text column, or WebDataset shards")
    images: list[Item] = []
    captions: list[Item] = []
    caption_image: list[int] = []
    failures: dict[str, str] = {}
    by_image: dict[str, int] = {}
    seen: set[str] = set()
    grouped = source.format == "table"  # table rows naming the same image are one image with several captions
    for number, item in enumerate(source):
        if item.error:
            failures[item.id] = item.error
            continue
        if not item.has_image:
            raise BgevlError(f"pairs {url}: item {number + 1} (id {item.id!r}) has no image; every pair needs one: "
                             f"fill its {image_column!r} cell or remove the row")
        text = item.text
        if text is None and item.text_uri is not None:
            fs, path = url_to_fs(item.text_uri)
            try:
                text = read_bytes(fs, path).decode("utf-8")
            except UnicodeDecodeError as exc:
                failures[item.id] = f"caption {item.text_uri} is not UTF-8 ({exc.reason}); re-encode it"
                continue
            except OSError as exc:
                failures[item.id] = f"cannot read caption {item.text_uri} ({exc.strerror or exc})"
                continue
        key = _image_key(item) if grouped else item.id
        index = by_image.get(key)
        if index is None and item.id in seen:  # possible across WebDataset shards: the first one is kept
            failures[f"{item.id} ({item.source})"] = f"id {item.id!r} occurs earlier in the input; this one is left out"
            continue
        seen.add(item.id)
        if index is None:
            index = by_image[key] = len(images)
            images.append(Item(id=item.id, source=item.source, image=item.image, image_uri=item.image_uri))
        texts = _split_captions(text) if text is not None else []
        for n, caption in enumerate(texts):
            cid = f"{item.id}#{n}" if len(texts) > 1 else item.id
            captions.append(Item(id=cid, source=item.source, text=caption))
            caption_image.append(index)
    if not images:
        raise BgevlError(f"pairs {url}: no items; give a folder of images with .txt captions, a table or shards")
    if not captions:
        raise BgevlError(f"pairs {url}: none of its {len(images)} images has a caption; put <stem>.txt beside each "
                         f"image, or name the table's text column with --text-column")
    return Pairs(source.describe(), images, captions, caption_image, failures)


def _load_triplet_file(path: str) -> list[Any]:
    fs, local = url_to_fs(path)
    try:
        raw = read_bytes(fs, local).decode("utf-8")
    except FileNotFoundError:
        raise BgevlError(f"triplets {path}: not found; give a CIRR/CIRCO-style .json file") from None
    except OSError as exc:
        raise BgevlError(f"triplets {path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise BgevlError(f"triplets {path}: not UTF-8 ({exc.reason} at byte {exc.start}); re-encode it") from None
    try:
        if local.lower().endswith((".jsonl", ".ndjson")):
            lines = [(n, line) for n, line in enumerate(raw.splitlines(), 1) if line.strip()]
            records = []
            for n, line in lines:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise BgevlError(f"triplets {path}: line {n} is not JSON ({exc.msg}); fix that line") from None
            return records
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BgevlError(f"triplets {path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
                         f"fix the file") from None
    if isinstance(data, dict):  # {"<query id>": {...}} as some releases write it
        data = [{"id": key, **value} if isinstance(value, dict) else value for key, value in data.items()]
    if not isinstance(data, list):
        raise BgevlError(f"triplets {path}: a JSON array of queries expected, found {type(data).__name__}")
    return data


def _first(record: dict, keys: tuple[str, ...]) -> Any:
    return next((record[k] for k in keys if record.get(k) not in (None, "")), None)


class GalleryIndex:
    """Finds a triplet's image id among the gallery's items: the item id itself, the id without its
    extension, the file name without extension, or the same number (CIRCO's COCO id 12345 is
    ``000000012345.jpg``). A name two items share is ambiguous and refused."""

    def __init__(self, items: list[Item]):
        self.keys: dict[str, int] = {}
        ambiguous: set[str] = set()
        for index, item in enumerate(items):
            stem = posixpath.splitext(item.id)[0]
            base = posixpath.basename(stem)
            names = {item.id, stem, base}
            if base.isdigit():
                names.add(str(int(base)))
            for name in names:
                if name in self.keys and self.keys[name] != index:
                    ambiguous.add(name)
                self.keys.setdefault(name, index)
        for name in ambiguous:
            self.keys[name] = -1

    def find(self, image_id: Any) -> int | None:
        """The gallery index, None when absent, -1 when ambiguous."""
        name = str(image_id)
        if name in self.keys:
            return self.keys[name]
        if name.isdigit() and str(int(name)) in self.keys:
            return self.keys[str(int(name))]
        return None


def read_triplets(path: str, gallery_url: str, gallery_format: str = "auto", id_column: str = "id",
                  image_column: str = "image", text_column: str = "text") -> Triplets:
    """Composed-retrieval queries from a CIRR/CIRCO-style JSON file over a gallery of images."""
    records = _load_triplet_file(path)
    if not records:
        raise BgevlError(f"triplets {path}: no queries in it")
    source = open_source(gallery_url, gallery_format, id_column, image_column, text_column)
    if isinstance(source, TextSource) or IMAGE not in source.available:
        raise BgevlError(f"gallery {gallery_url}: holds no images; give a folder of images, a table with an image "
                         f"column or WebDataset shards")
    gallery, failures, seen = [], {}, set()
    for item in source:
        if item.error or not item.has_image:
            failures[item.id] = item.error or "no image"
        elif item.id in seen:
            failures[f"{item.id} ({item.source})"] = f"id {item.id!r} occurs earlier in the gallery; this one is left out"
        else:
            seen.add(item.id)
            gallery.append(Item(id=item.id, source=item.source, image=item.image, image_uri=item.image_uri))
    if not gallery:
        raise BgevlError(f"gallery {gallery_url}: no readable images")
    index = GalleryIndex(gallery)
    queries: list[Item] = []
    references: list[int] = []
    targets: list[list[int]] = []
    missing: list[str] = []
    seen = set()
    for number, record in enumerate(records, 1):
        where = f"triplets {path}: query {number}"
        if not isinstance(record, dict):
            raise BgevlError(f"{where} is a {type(record).__name__}, not an object with reference, caption and target")
        qid = str(_first(record, QUERY_ID_KEYS) if _first(record, QUERY_ID_KEYS) is not None else number)
        if qid in seen:
            raise BgevlError(f"{where}: id {qid!r} occurs twice; query ids must be unique")
        seen.add(qid)
        reference, text = _first(record, REFERENCE_KEYS), _first(record, TEXT_KEYS)
        if reference is None:
            raise BgevlError(f"{where} (id {qid!r}) has no reference image (keys {', '.join(REFERENCE_KEYS)})")
        if text is None or not isinstance(text, str):
            raise BgevlError(f"{where} (id {qid!r}) has no modification text (keys {', '.join(TEXT_KEYS)})")
        wanted = []
        single = _first(record, TARGET_KEYS)
        if single is not None:
            wanted.append(single)
        many = _first(record, TARGET_LIST_KEYS)
        if many is not None:
            if not isinstance(many, list):
                raise BgevlError(f"{where} (id {qid!r}): {next(k for k in TARGET_LIST_KEYS if k in record)} must be a "
                                 f"list of image ids")
            wanted.extend(t for t in many if str(t) not in {str(w) for w in wanted})
        if not wanted:
            raise BgevlError(f"{where} (id {qid!r}) has no target image (keys {', '.join(TARGET_KEYS + TARGET_LIST_KEYS)}); "
                             f"every query needs at least one")
        found = []
        for image_id in [reference, *wanted]:
            position = index.find(image_id)
            if position == -1:
                raise BgevlError(f"{where}: image id {image_id!r} matches several items of gallery {gallery_url}; "
                                 f"give the gallery unique file names")
            if position is None:
                missing.append(str(image_id))
            found.append(position)
        if any(p is None for p in found):
            continue
        positions = cast("list[int]", found)  # none is None (above)
        ref_item = gallery[positions[0]]
        queries.append(Item(id=qid, source=f"{path}#{qid}", image=ref_item.image, image_uri=ref_item.image_uri,
                            text=text))
        references.append(positions[0])
        targets.append(positions[1:])
    if missing:
        raise BgevlError(f"triplets {path}: {len(missing)} image ids are not in gallery {gallery_url} (e.g. "
                         f"{missing[0]!r}); the gallery must hold every reference and target image")
    return Triplets({"triplets": str(path), "gallery": source.describe()}, queries, gallery, references, targets,
                    failures)


def _table_or_dir(root: Path, stem: str) -> Path | None:
    if (root / stem).is_dir():
        return root / stem
    return next((root / f"{stem}{suffix}" for suffix in TABLE_SUFFIXES if (root / f"{stem}{suffix}").is_file()), None)


def load_data(directory: str | os.PathLike, option: str = "--data") -> QualityData:
    """A data directory (see the module's docstring): pairs and/or triplets with their gallery."""
    root = Path(directory).expanduser().resolve()
    if not root.is_dir():
        raise BgevlError(f"{option} {root}: no such directory; give a directory with pairs/ and/or triplets.json "
                         f"and gallery/ (docs/quality.md)")
    pairs_path = _table_or_dir(root, "pairs")
    triplet_file = next((root / n for n in ("triplets.json", "triplets.jsonl") if (root / n).is_file()), None)
    gallery_path = _table_or_dir(root, "gallery")
    if triplet_file is not None and gallery_path is None:
        raise BgevlError(f"{option} {root}: {triplet_file.name} needs its images in {root}/gallery/ (or gallery.csv|"
                         f"jsonl|parquet)")
    if pairs_path is None and triplet_file is None:
        if next(root.rglob("*.txt"), None) is not None:  # a folder of captioned images is pairs
            pairs_path = root
        else:
            raise BgevlError(f"{option} {root}: holds neither pairs/ (or pairs.csv|jsonl|parquet) nor triplets.json "
                             f"with gallery/; see docs/quality.md for the layout")
    data = QualityData(location=str(root))
    if pairs_path is not None:
        data.pairs = read_pairs(str(pairs_path))
    if triplet_file is not None:
        data.triplets = read_triplets(str(triplet_file), str(gallery_path))
    return data
