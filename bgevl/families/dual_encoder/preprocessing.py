"""A dual encoder's preprocessing: the checkpoint's processor (CLIPProcessor, SiglipProcessor, ...) with the
model's declared text padding, BGE-VL's input rules and clear errors."""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from numpy.typing import NDArray

from bgevl.core.errors import InputError
from bgevl.core.family import Feeds, Preprocessor, Request, normalize_role
from bgevl.core.preprocessing import (
    DEFAULT_LIMITS, ImageInput, InputLimits, check_text, check_texts, count_tokens, load_image, load_processor,
)
from bgevl.core.specs import PIXEL_VALUES, TextPadding

log = logging.getLogger("bgevl")

TEXT_OVERFLOW_MODES = ("truncate", "error")


class DualEncoderPreprocessor(Preprocessor):
    """The checkpoint's processor, with the model's text padding (``text``), BGE-VL's input rules and clear errors.

    ``text_overflow``: ``"truncate"`` cuts texts over the model's token limit (77 for CLIP, the
    authors' evaluation setting) and logs a warning naming them; ``"error"`` raises instead
    (BGE-VL's own ``encode`` does not truncate and fails inside the model).
    """

    def __init__(self, processor: Any, max_text_length: int, text_overflow: str = "truncate",
                 limits: InputLimits = DEFAULT_LIMITS, text: TextPadding = TextPadding()):
        if text_overflow not in TEXT_OVERFLOW_MODES:
            raise ValueError(f"text_overflow must be one of {TEXT_OVERFLOW_MODES}, got {text_overflow!r}")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.max_text_length = max_text_length
        self.text_overflow = text_overflow
        self.limits = limits
        self.text = text
        self.image_model_size = self.short_side = _model_size(self.image_processor)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], max_text_length: int, text_overflow: str = "truncate",
                        limits: InputLimits = DEFAULT_LIMITS, text: TextPadding = TextPadding()) -> "DualEncoderPreprocessor":
        return cls(load_processor(directory), max_text_length, text_overflow, limits, text)

    def pixel_values(self, images: Iterable[ImageInput], start: int = 0) -> NDArray[Any]:
        """``start``: index of the first item in the caller's list (error messages name items by it)."""
        # one image at a time: only one decoded full-size image is held, whatever the batch (64 images of
        # 40 M pixels decoded together would be about 8 GB)
        return np.concatenate([
            np.asarray(self.image_processor(images=[load_image(item, start + i, limits=self.limits,
                                                               model_size=self.short_side)],
                                            return_tensors="np")["pixel_values"], dtype=np.float32)
            for i, item in enumerate(images)])

    def tokens(self, texts: Sequence[Any], pad_to_max_length: bool = False, start: int = 0) -> dict[str, NDArray[Any]]:
        """The text graph's inputs (``self.text.input_names``), padded to the longest text, or to the model's
        limit with ``pad_to_max_length`` (fixed shapes, which Triton's dynamic batcher needs to merge requests)
        or where the model declares a fixed length. ``start``: index of the first text in the caller's list
        (error messages name items by it)."""
        texts = [check_text(t, "text", start + i, self.limits) for i, t in enumerate(texts)]
        pad_to_max_length = pad_to_max_length or self.text.fixed_length is not None
        padding = "max_length" if pad_to_max_length else True
        enc = self.tokenizer(texts, add_special_tokens=True, verbose=False)
        over = [(start + i, len(ids)) for i, ids in enumerate(enc["input_ids"]) if len(ids) > self.max_text_length]
        if not over:  # the common case: pad the one tokenization, no second pass
            enc = self.tokenizer.pad(enc, padding=padding, max_length=self.max_text_length if pad_to_max_length else None,
                                     return_tensors="np")
        else:
            listed = ", ".join(f"text[{i}] ({n} tokens)" for i, n in over)
            if self.text_overflow == "error":
                reason = f"over the model's limit of {self.max_text_length} tokens; shorten it or use text_overflow='truncate'"
                raise InputError(f"{listed} {reason}", field="text", index=over[0][0], reason=f"{over[0][1]} tokens, {reason}")
            log.warning("truncating %s to the model's limit of %d tokens", listed, self.max_text_length)
            # re-tokenized by the tokenizer itself so truncation keeps <|endoftext|> last (EOS pooling)
            enc = self.tokenizer(texts, padding=padding, truncation=True, max_length=self.max_text_length, return_tensors="np")
        return {name: np.asarray(enc[name]).astype(np.int64) for name in self.text.input_names}

    def check(self, request: Request) -> Request:
        """A dual encoder encodes queries and candidates alike: a role is accepted and has no effect, an
        instruction is an error (BGE-VL's CLIP models take none); every text is checked before any work."""
        if request.instruction is not None:
            raise InputError.of_item("instruction", None, "this dual encoder takes no task instruction (BGE-VL's CLIP "
                                                          "models take none; only the MLLM does)")
        if request.role is not None:
            normalize_role(request.role)
        if request.texts is not None:
            check_texts(request.texts, self.limits)
        return request

    def text_lengths(self, request: Request, start: int = 0) -> list[tuple[int, int] | None]:
        """Each text's tokens with its start and end tokens against the text tower's limit."""
        return [None if text is None else (count_tokens(self.tokenizer, text), self.max_text_length)
                for text in request.texts or []]

    def prepare(self, request: Request, start: int = 0, *, serving: bool = False) -> Feeds:
        """``pixel_values`` for the images, the text graph's inputs for the texts (padded to the model's
        limit when ``serving``: fixed shapes let Triton's dynamic batcher merge requests)."""
        feeds: Feeds = {}
        if request.images is not None:
            feeds[PIXEL_VALUES] = self.pixel_values(request.images, start)
        if request.texts is not None:
            feeds.update(self.tokens(request.texts, pad_to_max_length=serving, start=start))
        return feeds


def _model_size(image_processor: Any) -> int | tuple[int, int] | None:
    """What the image processor resizes to, for the reduced-scale decode of large JPEGs: the short side
    (CLIP: ``shortest_edge``) or width and height (SigLIP: a square resize without a crop)."""
    size = getattr(image_processor, "size", None)
    get: Callable[[str], Any] = size.get if isinstance(size, dict) else (lambda key: getattr(size, key, None))
    if get("shortest_edge"):
        return int(get("shortest_edge"))
    if get("height") and get("width"):
        return int(get("width")), int(get("height"))
    return None
