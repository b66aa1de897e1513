"""Input checking and the model's own preprocessing (CLIP image processor and tokenizer).

Shared by the runtime, the exporter's validation and the Triton preprocessing model, so the
three feed the graphs identical tensors. Every error names the offending item by its index.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from bgevl.errors import InputError

log = logging.getLogger("bgevl")

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image]

TEXT_OVERFLOW_MODES = ("truncate", "error")


def _describe(item: Any) -> str:
    if isinstance(item, (str, os.PathLike)):
        return f"'{os.fspath(item)}'"
    if isinstance(item, (bytes, bytearray, memoryview)):
        return f"<{len(item)} bytes>"
    return f"<{type(item).__name__}>"


#: The image-processor backend, pinned. transformers 5 picks the torchvision backend whenever
#: torchvision is importable and PIL otherwise (``image_processing_auto._resolve_backend``); BGE-VL's
#: hub files name only the legacy ``CLIPFeatureExtractor`` and the original (transformers 4.45) ran
#: the PIL/numpy path, so installing torchvision must not change any embedding.
IMAGE_PROCESSOR_BACKEND = "pil"


def load_processor(directory: str | os.PathLike) -> Any:
    """The checkpoint's (or export's) processor, with the image-processor backend pinned to PIL."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(directory, backend=IMAGE_PROCESSOR_BACKEND)


def load_image(item: ImageInput, index: int = 0, convert_rgb: bool = True) -> Image.Image:
    """Open one image (path, bytes or PIL image) fully and, by default, convert it to RGB.

    BGE-VL's CLIP ``encode`` converts every image to RGB before the processor; so do we. The MLLM
    resizes first and converts after (``convert_rgb=False`` here; see ``MllmPreprocessor``).
    """
    where = f"images[{index}] {_describe(item)}"
    if isinstance(item, Image.Image):
        image = item
    elif isinstance(item, (bytes, bytearray, memoryview)):
        if len(item) == 0:
            raise InputError(f"{where}: empty byte string; pass the encoded image file's bytes (PNG, JPEG, ...)")
        image = _open(io.BytesIO(bytes(item)), where)
    elif isinstance(item, (str, os.PathLike)):
        path = Path(item).expanduser()
        if not path.exists():
            raise InputError(f"{where}: file not found; check the path")
        if path.is_dir():
            raise InputError(f"{where}: is a directory, not an image file")
        with open(path, "rb") as fh:
            image = _open(io.BytesIO(fh.read()), where)
    else:
        raise InputError(
            f"{where}: unsupported image type {type(item).__name__}; pass a file path, the file's bytes or a PIL.Image"
        )
    try:
        image.load()
        return image.convert("RGB") if convert_rgb else image
    except (OSError, ValueError) as exc:
        raise InputError(f"{where}: the image data is corrupt or truncated ({exc}); re-encode or replace the file") from exc


def _open(stream: io.BytesIO, where: str) -> Image.Image:
    try:
        image = Image.open(stream)
        image.load()  # decode now: a truncated file fails here, not later inside the processor
        return image
    except UnidentifiedImageError as exc:
        raise InputError(f"{where}: not a readable image (Pillow cannot identify the format); pass a PNG, JPEG, WebP, ... file") from exc
    except (OSError, ValueError) as exc:
        raise InputError(f"{where}: the image data is corrupt or truncated ({exc}); re-encode or replace the file") from exc


def as_list(value: Any, kind: str) -> list | None:
    """Accept one item or a sequence of items; ``None`` stays ``None``."""
    if value is None:
        return None
    if kind == "text" and isinstance(value, str):
        return [value]
    if kind == "images" and isinstance(value, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)):
        return [value]
    if isinstance(value, np.ndarray):
        raise InputError(f"{kind}: pass a list of {'strings' if kind == 'text' else 'images'}, not a numpy array")
    items = list(value)
    if not items:
        raise InputError(f"{kind}: empty list; pass at least one item or leave it out")
    return items


def check_texts(texts: Sequence[Any]) -> list[str]:
    out = []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InputError(f"text[{i}]: expected a string, got {type(t).__name__}")
        if not t.strip():
            raise InputError(f"text[{i}]: empty text; every text needs at least one non-space character")
        out.append(t)
    return out


class ClipPreprocessor:
    """The checkpoint's CLIPProcessor, with BGE-VL's input rules and clear errors.

    ``text_overflow``: ``"truncate"`` cuts texts over the model's token limit (77 for CLIP, the
    authors' evaluation setting) and logs a warning naming them; ``"error"`` raises instead
    (BGE-VL's own ``encode`` does not truncate and fails inside the model).
    """

    def __init__(self, processor: Any, max_text_length: int, text_overflow: str = "truncate"):
        if text_overflow not in TEXT_OVERFLOW_MODES:
            raise ValueError(f"text_overflow must be one of {TEXT_OVERFLOW_MODES}, got {text_overflow!r}")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.max_text_length = max_text_length
        self.text_overflow = text_overflow

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, max_text_length: int, text_overflow: str = "truncate") -> "ClipPreprocessor":
        return cls(load_processor(directory), max_text_length, text_overflow)

    def pixel_values(self, images: Iterable[ImageInput]) -> np.ndarray:
        pil = [load_image(item, i) for i, item in enumerate(images)]
        return np.asarray(self.image_processor(images=pil, return_tensors="np")["pixel_values"], dtype=np.float32)

    def tokens(self, texts: Sequence[Any], pad_to_max_length: bool = False) -> dict[str, np.ndarray]:
        """Token ids and attention mask, padded to the longest text, or to the model's limit with
        ``pad_to_max_length`` (fixed shapes, which Triton's dynamic batcher needs to merge requests)."""
        texts = check_texts(texts)
        padding = "max_length" if pad_to_max_length else True
        enc = self.tokenizer(texts, add_special_tokens=True, verbose=False)
        over = [(i, len(ids)) for i, ids in enumerate(enc["input_ids"]) if len(ids) > self.max_text_length]
        if not over:  # the common case: pad the one tokenization, no second pass
            enc = self.tokenizer.pad(enc, padding=padding, max_length=self.max_text_length if pad_to_max_length else None,
                                     return_tensors="np")
        else:
            listed = ", ".join(f"text[{i}] ({n} tokens)" for i, n in over)
            if self.text_overflow == "error":
                raise InputError(
                    f"{listed} over the model's limit of {self.max_text_length} tokens; shorten it or "
                    f"use text_overflow='truncate'"
                )
            log.warning("truncating %s to the model's limit of %d tokens", listed, self.max_text_length)
            # re-tokenized by the tokenizer itself so truncation keeps <|endoftext|> last (EOS pooling)
            enc = self.tokenizer(texts, padding=padding, truncation=True, max_length=self.max_text_length, return_tensors="np")
        return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}
