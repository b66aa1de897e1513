"""Preprocessing of BGE-VL-Screenshot inputs: chat messages, transformers' Qwen2.5-VL processor, and the feeds of
the vision graph (each image's patches in window order, rotary positions, segments) and of the language graph
(M-RoPE positions, the image-feature index).

The recipe is a declaration (:class:`ScreenshotPrompts`), stored in the export's manifest. BAAI published the
model's usage (VectorSpaceLab/Vis-IR ``README.md``: ``data_process(images, text, q_or_c, task_instruction)``, the
query instruction "Represent the given image with the given query.", candidates without one) but not, readably,
the body of its remote code (``modeling_bge_vl_screenshot.py``); each fact below names its source and whether it
is the model's own or a third party's reconstruction, so that a user with the real files can correct it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

from bgevl.core.errors import InputError
from bgevl.core.family import CANDIDATE, QUERY, Feeds, Preprocessor, Request, normalize_role
from bgevl.core.preprocessing import (
    DEFAULT_LIMITS, InputLimits, check_no_control_tokens, check_text, control_tokens, count_tokens, header_size,
    load_image,
)
from bgevl.core.specs import ATTENTION_MASK, INPUT_IDS
from bgevl.families.screenshot.graphs import (
    IMAGE_FEATURE_INDEX, IMAGE_RESTORE, IMAGE_SEGMENTS, IMAGE_TOKEN_COUNTS, PIXEL_PATCHES, ROPE_POSITIONS,
    VISION_POSITIONS, WINDOW_SEGMENTS,
)
from bgevl.families.screenshot.layout import VisionGeometry, image_layout, rope_positions

log = logging.getLogger("bgevl")

#: The query instruction of BGE-VL-Screenshot's usage example (VectorSpaceLab/Vis-IR README, "Usage")
SCREENSHOT_QUERY_INSTRUCTION = "Represent the given image with the given query."


@dataclass(frozen=True)
class ScreenshotPrompts:
    """How an item becomes a chat prompt. Defaults: the reconstruction of ckgresla/representax
    (``src/representax/models/qwen2_vl/processing.py``, ``_bge_messages``; matched there against
    sentence-transformers' loading of the hub files at revision 2b0f1cd) unless said otherwise."""

    #: the task instruction is the system message (representax; sentence-transformers' ``encode(prompt=...)``
    #: prepends its prompt as a system message too)
    instruction_role: str = "system"
    #: a candidate has no instruction, so the chat template inserts its default system line (Vis-IR README:
    #: ``data_process(images, q_or_c="candidate")`` takes no instruction); not verified in the remote code
    candidate_instruction: str | None = None
    #: the user turn holds the text, then the image (representax); Qwen's own examples put the image first:
    #: not verified in the remote code
    content_order: str = "text-first"
    #: every prompt ends with the assistant turn's opening, whose last token is pooled (representax)
    add_generation_prompt: bool = True

    def __post_init__(self) -> None:
        if self.content_order not in ("text-first", "image-first"):
            raise ValueError(f"content_order {self.content_order!r}: text-first or image-first")
        if self.instruction_role not in ("system", "user"):
            raise ValueError(f"instruction_role {self.instruction_role!r}: system or user")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ScreenshotPrompts":
        return cls(**data)

    def messages(self, text: str | None, has_image: bool, instruction: str | None) -> list[dict[str, Any]]:
        """One item's chat messages (a system message with the instruction, then the user turn)."""
        parts: list[dict[str, Any]] = []
        if text is not None:
            parts.append({"type": "text", "text": text})
        if has_image:
            parts.insert(0 if self.content_order == "image-first" else len(parts), {"type": "image"})
        if instruction is None:
            return [{"role": "user", "content": parts}]
        if self.instruction_role == "user":
            return [{"role": "user", "content": [{"type": "text", "text": instruction}, *parts]}]
        return [{"role": "system", "content": [{"type": "text", "text": instruction}]}, {"role": "user", "content": parts}]


class ScreenshotPreprocessor(Preprocessor):
    """Chat prompts, the checkpoint's Qwen2.5-VL processor and the host-side layouts, for one batch."""

    def __init__(self, processor: Any, geometry: VisionGeometry, prompts: ScreenshotPrompts, max_sequence: int,
                 limits: InputLimits = DEFAULT_LIMITS, token_budget: int | None = None):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.geometry = geometry
        self.prompts = prompts
        self.max_sequence = max_sequence
        self.limits = limits
        self.image_token_id = int(processor.image_token_id)
        self.control_tokens = control_tokens(self.tokenizer)
        #: a batch holds at most this many tokens, padding included (default: the sequence limit of the
        #: language graph's optimal batch): an item's cost varies with its image's size, 5x and more
        self.token_budget = token_budget

    def prompt(self, text: str | None, has_image: bool, role: str, instruction: str | None) -> str:
        if role == CANDIDATE:
            instruction = self.prompts.candidate_instruction
        rendered: str = self.processor.apply_chat_template(
            self.prompts.messages(text, has_image, instruction), tokenize=False,
            add_generation_prompt=self.prompts.add_generation_prompt)
        return rendered

    def check(self, request: Request) -> Request:
        """The role defaults to ``query`` when an instruction is given, else ``candidate``; a candidate takes no
        instruction (its prompt is the declared candidate prompt)."""
        role = normalize_role(request.role) if request.role is not None else (
            QUERY if request.instruction is not None else CANDIDATE)
        if role == CANDIDATE and request.instruction is not None:
            raise InputError("instruction applies to queries only; a BGE-VL-Screenshot candidate has none",
                             field="instruction")
        if request.instruction is not None:
            check_text(request.instruction, "instruction", None, self.limits)
            check_no_control_tokens(request.instruction, self.control_tokens, "instruction")
        return replace(request, role=role)

    def prompts_and_images(self, request: Request, start: int = 0) -> tuple[list[str], list[Any]]:
        """A checked request's chat prompts and its decoded images (those of the items that have one)."""
        prompts, images = [], []
        for i in range(len(request)):
            text = request.texts[i] if request.texts is not None else None
            image = request.images[i] if request.images is not None else None
            if text is None and image is None:
                raise InputError(f"item {start + i}: needs an image, a text or both")
            if text is not None:
                check_text(text, "text", start + i, self.limits, " (pass None for an image-only item)")
                check_no_control_tokens(text, self.control_tokens, "text", start + i)
            if image is not None:
                images.append(load_image(image, start + i, limits=self.limits))
            assert request.role is not None  # check() sets it
            prompts.append(self.prompt(text, image is not None, request.role, request.instruction))
        return prompts, images

    def item_costs(self, request: Request, start: int = 0) -> list[int]:
        """Each item's tokens: its prompt's, with its image's tokens from the header size by the processor's own
        resize rule (an unreadable image counts 0: ``prepare`` refuses it)."""
        request = self.check(request)
        assert request.role is not None  # check() sets it
        costs = []
        merge = self.geometry.merge_unit
        for i in range(len(request)):
            text = request.texts[i] if request.texts is not None else None
            image = request.images[i] if request.images is not None else None
            size = header_size(image) if image is not None else None
            tokens = 0
            if size is not None:
                width, height = size
                try:  # an image the limits refuse counts 0 here: prepare refuses it in one line
                    tokens = int(self.processor.image_processor.get_number_of_image_patches(height, width, {})) // merge - 1
                except ValueError:
                    tokens = 0
            prompt = self.prompt(text if isinstance(text, str) else None, image is not None, request.role, request.instruction)
            costs.append(count_tokens(self.tokenizer, prompt, special_tokens=False) + max(tokens, 0))
        return costs

    def text_lengths(self, request: Request, start: int = 0) -> list[tuple[int, int] | None]:
        """Each item's prompt and image tokens against the exported sequence limit."""
        texts = request.texts or [None] * len(request)
        return [None if text is None else (cost, self.max_sequence)
                for text, cost in zip(texts, self.item_costs(request, start))]

    def prepare(self, request: Request, start: int = 0, *, serving: bool = False) -> Feeds:
        """Feeds of both graphs for one batch; the vision feeds (absent when no item has an image) hold every
        image's patches one after the other, with ``image_token_counts`` to split them per image."""
        request = self.check(request)
        prompts, images = self.prompts_and_images(request, start)
        enc = self.processor(text=prompts, images=images or None, padding=True, return_tensors="np")
        input_ids = np.asarray(enc["input_ids"], np.int64)
        attention_mask = np.asarray(enc["attention_mask"], np.int64)
        over = [(i, int(n)) for i, n in enumerate(attention_mask.sum(axis=1)) if n > self.max_sequence]
        if over:
            listed = ", ".join(f"item {start + i} ({n} tokens)" for i, n in over)
            raise InputError(f"{listed} over the exported sequence limit of {self.max_sequence} tokens (prompt plus "
                             f"image tokens); shorten the text, lower the pixel bound (--max-pixels) or re-export with a "
                             f"larger --max-sequence-length. Truncation is not applied: it would cut the image tokens "
                             f"or the final prompt token the embedding is read from")
        grids = [tuple(int(v) for v in g) for g in enc["image_grid_thw"]] if images else []
        feeds: Feeds = {INPUT_IDS: input_ids, ATTENTION_MASK: attention_mask,
                        ROPE_POSITIONS: rope_positions(input_ids, attention_mask, grids, self.image_token_id,  # type: ignore[arg-type]
                                                       self.geometry.merge_size)}
        index = np.full(input_ids.shape, -1, np.int64)
        image_positions = input_ids == self.image_token_id
        index[image_positions] = np.arange(int(image_positions.sum()))
        feeds[IMAGE_FEATURE_INDEX] = index
        if images:
            feeds.update(vision_feeds(np.asarray(enc["pixel_values"], np.float32), grids, self.geometry))  # type: ignore[arg-type]
        return feeds


def vision_feeds(pixel_values: NDArray[Any], grids: Sequence[tuple[int, int, int]],
                 geometry: VisionGeometry) -> dict[str, NDArray[Any]]:
    """The vision graph's feeds of a batch's images, one after the other in window order, and how to split them
    (``image_token_counts``) and restore the raster order of their outputs (``image_restore``)."""
    patches, positions, windows, segments, restore, counts = [], [], [], [], [], []
    first_patch = first_token = first_window = 0
    for number, grid in enumerate(grids):
        layout = image_layout(grid, geometry)
        n = int(np.prod(grid))
        patches.append(pixel_values[first_patch:first_patch + n][layout.order].reshape(layout.tokens, geometry.merge_unit, -1))
        positions.append(layout.positions)
        windows.append(layout.windows + first_window)
        segments.append(np.full(layout.tokens, number, np.int64))
        restore.append(layout.restore + first_token)
        counts.append(layout.tokens)
        first_patch, first_token, first_window = first_patch + n, first_token + layout.tokens, first_window + int(layout.windows.max()) + 1
    return {PIXEL_PATCHES: np.ascontiguousarray(np.concatenate(patches)), VISION_POSITIONS: np.concatenate(positions),
            WINDOW_SEGMENTS: np.concatenate(windows), IMAGE_SEGMENTS: np.concatenate(segments),
            IMAGE_RESTORE: np.concatenate(restore), IMAGE_TOKEN_COUNTS: np.asarray(counts, np.int64)}
