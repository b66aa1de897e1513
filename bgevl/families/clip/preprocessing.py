"""CLIP preprocessing: the checkpoint's CLIPProcessor with BGE-VL's input rules and clear errors."""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Sequence

import numpy as np

from bgevl.core.errors import InputError
from bgevl.core.family import Feeds, Preprocessor, Request, normalize_role
from bgevl.core.preprocessing import (
    DEFAULT_LIMITS, ImageInput, InputLimits, check_text, check_texts, load_image, load_processor,
)
from bgevl.core.specs import ATTENTION_MASK, INPUT_IDS, PIXEL_VALUES

log = logging.getLogger("bgevl")

TEXT_OVERFLOW_MODES = ("truncate", "error")


class ClipPreprocessor(Preprocessor):
    """The checkpoint's CLIPProcessor, with BGE-VL's input rules and clear errors.

    ``text_overflow``: ``"truncate"`` cuts texts over the model's token limit (77 for CLIP, the
    authors' evaluation setting) and logs a warning naming them; ``"error"`` raises instead
    (BGE-VL's own ``encode`` does not truncate and fails inside the model).
    """

    def __init__(self, processor: Any, max_text_length: int, text_overflow: str = "truncate",
                 limits: InputLimits = DEFAULT_LIMITS):
        if text_overflow not in TEXT_OVERFLOW_MODES:
            raise ValueError(f"text_overflow must be one of {TEXT_OVERFLOW_MODES}, got {text_overflow!r}")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.max_text_length = max_text_length
        self.text_overflow = text_overflow
        self.limits = limits
        size = getattr(self.image_processor, "size", None)
        self.short_side = getattr(size, "shortest_edge", None) or (size.get("shortest_edge") if isinstance(size, dict) else None)
        self.image_model_size = self.short_side

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, max_text_length: int, text_overflow: str = "truncate",
                        limits: InputLimits = DEFAULT_LIMITS) -> "ClipPreprocessor":
        return cls(load_processor(directory), max_text_length, text_overflow, limits)

    def pixel_values(self, images: Iterable[ImageInput], start: int = 0) -> np.ndarray:
        """``start``: index of the first item in the caller's list (error messages name items by it)."""
        # one image at a time: only one decoded full-size image is held, whatever the batch (64 images of
        # 40 M pixels decoded together would be about 8 GB)
        return np.concatenate([
            np.asarray(self.image_processor(images=[load_image(item, start + i, limits=self.limits,
                                                               model_size=self.short_side)],
                                            return_tensors="np")["pixel_values"], dtype=np.float32)
            for i, item in enumerate(images)])

    def tokens(self, texts: Sequence[Any], pad_to_max_length: bool = False, start: int = 0) -> dict[str, np.ndarray]:
        """Token ids and attention mask, padded to the longest text, or to the model's limit with
        ``pad_to_max_length`` (fixed shapes, which Triton's dynamic batcher needs to merge requests).
        ``start``: index of the first text in the caller's list (error messages name items by it)."""
        texts = [check_text(t, f"text[{start + i}]", self.limits) for i, t in enumerate(texts)]
        padding = "max_length" if pad_to_max_length else True
        enc = self.tokenizer(texts, add_special_tokens=True, verbose=False)
        over = [(start + i, len(ids)) for i, ids in enumerate(enc["input_ids"]) if len(ids) > self.max_text_length]
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
        return {INPUT_IDS: enc["input_ids"].astype(np.int64), ATTENTION_MASK: enc["attention_mask"].astype(np.int64)}

    def check(self, request: Request) -> Request:
        """CLIP encodes queries and candidates alike: a role is accepted and has no effect, an instruction
        is an error (BGE-VL's CLIP models take none); every text is checked before any work."""
        if request.instruction is not None:
            raise InputError("instruction: BGE-VL's CLIP models take no task instruction (only the MLLM does)")
        if request.role is not None:
            normalize_role(request.role)
        if request.texts is not None:
            check_texts(request.texts, self.limits)
        return request

    def prepare(self, request: Request, start: int = 0, *, serving: bool = False) -> Feeds:
        """``pixel_values`` for the images, ``input_ids``/``attention_mask`` for the texts (padded to the
        model's limit when ``serving``: fixed shapes let Triton's dynamic batcher merge requests)."""
        feeds: Feeds = {}
        if request.images is not None:
            feeds[PIXEL_VALUES] = self.pixel_values(request.images, start)
        if request.texts is not None:
            feeds.update(self.tokens(request.texts, pad_to_max_length=serving, start=start))
        return feeds
