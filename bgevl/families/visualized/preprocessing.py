"""Visualized-BGE preprocessing: EVA-CLIP's image transform and the BGE tokenizer with the position limit.

Image (FE ``eva_clip/transform.py`` ``image_transform(is_train=False)``): ``Resize(224, BICUBIC)``
of the shorter side -> ``CenterCrop(224)`` -> ``convert("RGB")`` -> ``ToTensor`` -> ``Normalize``
(OpenAI mean/std). torchvision is not installable beside this CPU torch, so the transform is
written with Pillow after torchvision 0.28's ``transforms/functional.py``: the longer side becomes
``int(224 * long / short)``; the crop offset is ``int(round((h - 224) / 2))`` (Python's round, half
to even; transformers' CLIP processor uses ``//`` and differs by a pixel for some sizes); the RGB
conversion comes after the crop (FE's order: palette images are resized by Pillow as palette).
FE's ``encode`` opens paths with ``Image.open`` (no EXIF rotation); so does this.

Text: FE tokenizes with ``padding=True`` and no truncation. In the multimodal sequence the text
token t >= 1 sits at position N + t, so a composed item's text may have at most
``max_position_embeddings - N`` tokens (316 for bge-visualized-base-en-v1.5); a text alone
``max_position_embeddings`` (BERT) or ``max_position_embeddings - 2`` (XLM-R numbers from the
padding index + 1). Longer texts are refused (``text_overflow="error"``, the default) or cut to
the limit keeping the final separator, with a warning naming them (``"truncate"``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from bgevl.core.errors import InputError
from bgevl.core.family import Feeds, Preprocessor, Request, normalize_role
from bgevl.core.preprocessing import DEFAULT_LIMITS, InputLimits, check_text, check_texts, count_tokens, load_image
from bgevl.core.specs import ATTENTION_MASK, INPUT_IDS, PIXEL_VALUES

log = logging.getLogger("bgevl")

TEXT_OVERFLOW_MODES = ("error", "truncate")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TextLayout:
    """How texts are placed in the text model (the manifest's ``recipe``)."""

    image_size: int
    image_tokens: int  # N: patch tokens of the tower
    max_position_embeddings: int
    text_model_type: str  # "bert" | "xlm-roberta"
    max_text_length: int  # the text graph's longest sequence

    @property
    def text_only_limit(self) -> int:
        positions = self.max_position_embeddings - (2 if self.text_model_type == "xlm-roberta" else 0)
        return min(self.max_text_length, positions)

    @property
    def multimodal_limit(self) -> int:
        return min(self.max_text_length, self.max_position_embeddings - self.image_tokens)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TextLayout":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after torchvision's ``Resize(size)``: the shorter side to ``size``, the longer truncated."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """torchvision's ``center_crop`` offsets: ``int(round((side - size) / 2))``."""
    left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
    return left, top, left + size, top + size


def pixel_values(image: Image.Image, size: int) -> NDArray[Any]:
    """One image -> float32 [3, size, size]."""
    new = resized_size(*image.size, size)
    if new != image.size:
        image = image.resize(new, Image.Resampling.BICUBIC)  # = Image.BICUBIC (not in Pillow's types)
    image = image.crop(center_crop_box(*image.size, size)).convert("RGB")
    array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / np.float32(255)
    mean, std = (np.asarray(v, np.float32)[:, None, None] for v in (OPENAI_MEAN, OPENAI_STD))
    normalized: NDArray[Any] = (array - mean) / std
    return normalized


class VisualizedPreprocessor(Preprocessor):
    """A request -> ``pixel_values`` (items with an image) and ``input_ids``/``attention_mask`` (every item:
    its text, or the empty prompt ``[CLS][SEP]`` of FE's ``encode_image`` for an image alone).

    A request is all images, all texts or all composed pairs (FE's ``encode(images=, text=)``); a
    role is accepted and has no effect, an instruction is refused (Visualized-BGE has none: put the
    task into the text)."""

    def __init__(self, tokenizer: Any, layout: TextLayout, text_overflow: str = "error",
                 limits: InputLimits = DEFAULT_LIMITS):
        if text_overflow not in TEXT_OVERFLOW_MODES:
            raise ValueError(f"text_overflow must be one of {TEXT_OVERFLOW_MODES}, got {text_overflow!r}")
        if tokenizer.padding_side != "right":
            raise ValueError("Visualized-BGE needs right padding (FE's mask is cat(ones(N), text_mask))")
        self.tokenizer, self.layout, self.text_overflow, self.limits = tokenizer, layout, text_overflow, limits
        self.image_model_size = layout.image_size

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], layout: TextLayout, text_overflow: str = "error",
                        limits: InputLimits = DEFAULT_LIMITS) -> "VisualizedPreprocessor":
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(directory)), layout, text_overflow, limits)

    def check(self, request: Request) -> Request:
        if request.instruction is not None:
            raise InputError.of_item("instruction", None, "Visualized-BGE takes no task instruction; put the task into "
                                                          "the text")
        if request.role is not None:
            normalize_role(request.role)
        for name, items in (("images", request.images), ("text", request.texts)):
            missing = [i for i, item in enumerate(items or []) if item is None]
            if missing:
                reason = ("is None: a request is all images, all texts or all image+text pairs; send items of "
                          "different kinds as separate requests")
                raise InputError(f"{name}[{missing[0]}] {reason}", field=name, index=missing[0], reason=reason)
        if request.images is not None and request.texts is not None and len(request.images) != len(request.texts):
            raise InputError(f"{len(request.images)} images and {len(request.texts)} texts: composed items pair "
                             f"one image with one text")
        if request.texts is not None:
            check_texts(request.texts, self.limits)
        return request

    def text_lengths(self, request: Request, start: int = 0) -> list[tuple[int, int] | None]:
        """Each text's tokens with [CLS] and [SEP] against the limit of a text alone or beside the image tokens."""
        limit = self.layout.multimodal_limit if request.images is not None else self.layout.text_only_limit
        return [None if text is None else (count_tokens(self.tokenizer, text), limit) for text in request.texts or []]

    def tokens(self, texts: Sequence[Any], composed: bool, start: int = 0) -> dict[str, NDArray[Any]]:
        texts = [check_text(t, "text", start + i, self.limits) for i, t in enumerate(texts)]
        limit = self.layout.multimodal_limit if composed else self.layout.text_only_limit
        encoded = self.tokenizer(texts, add_special_tokens=True, verbose=False)
        over = [(start + i, len(ids)) for i, ids in enumerate(encoded["input_ids"]) if len(ids) > limit]
        if over:
            listed = ", ".join(f"text[{i}] ({n} tokens)" for i, n in over)
            where = "beside the image tokens" if composed else "alone"
            if self.text_overflow == "error":
                reason = (f"over the limit of {limit} tokens for a text {where} (the text model's "
                          f"{self.layout.max_position_embeddings} positions); shorten it or use text_overflow='truncate'")
                raise InputError(f"{listed} {reason}", field="text", index=over[0][0], reason=f"{over[0][1]} tokens, {reason}")
            log.warning("truncating %s to the limit of %d tokens for a text %s", listed, limit, where)
            encoded = self.tokenizer(texts, truncation=True, max_length=limit, verbose=False)  # keeps [SEP] last
        padded = self.tokenizer.pad(encoded, padding=True, return_tensors="np")
        return {INPUT_IDS: padded["input_ids"].astype(np.int64), ATTENTION_MASK: padded["attention_mask"].astype(np.int64)}

    def prepare(self, request: Request, start: int = 0, *, serving: bool = False) -> Feeds:
        feeds: Feeds = {}
        if request.images is not None:
            size = self.layout.image_size
            # one image at a time: only one decoded full-size image is held; RGB after the crop (FE's order)
            feeds[PIXEL_VALUES] = np.stack([
                pixel_values(load_image(item, start + i, convert_rgb=False, limits=self.limits, model_size=size), size)
                for i, item in enumerate(request.images)])
            if request.texts is None:  # FE encode_image: the prompt "" -> [CLS][SEP]
                encoded = self.tokenizer([""] * len(request.images), padding=True, return_tensors="np")
                feeds.update({INPUT_IDS: encoded["input_ids"].astype(np.int64),
                              ATTENTION_MASK: encoded["attention_mask"].astype(np.int64)})
            else:
                feeds.update(self.tokens(request.texts, True, start))
        elif request.texts is not None:
            feeds.update(self.tokens(request.texts, False, start))
        return feeds
