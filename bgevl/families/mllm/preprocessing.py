"""Preprocessing of BGE-VL-MLLM (LLaVA-NeXT) inputs: prompts, images, tokens and the image-feature index.

Prompts and image handling follow BGE-VL-MLLM's remote code (VectorSpaceLab/MegaPairs,
``LLaVANextForEmbedding.prepare_text_input`` and ``data_process``, also in the hub repository
BAAI/BGE-VL-MLLM-S1's ``modeling_llavanext_for_embedding.py``), with its exact strings:

* query:     ``"[INST] \\n <instruct> {instruction} <query> "`` + ``" {text} \\n"`` + ``" <image>"`` + ``" [/INST]"``
  (pieces joined as ``f"{prev} {piece}"``); without an instruction ``"[INST] \\n <instruct>  <query>"``
  and a warning, as the original prints one.
* candidate: ``"[INST] "`` + ``" {text} \\n"`` + ``" <image>"`` + ``" [/INST]"``.
* every image is resized to 512x512 and converted to RGB before the ``LlavaNextProcessor``.
* no EOS is appended; the embedding is the last token's hidden state (from ``[/INST]``).

LLaVA-NeXT's anyres packing (``pack_image_features`` in transformers: base tile, grid tiles
re-arranged into one feature map, unpadded to the image's aspect ratio, an ``image_newline``
vector after every row) is a pure function of the image size. It is computed here as an index
tensor, ``image_feature_index``, so the exported language graph only gathers rows: -1 marks a
text token, 0 the newline vector, k >= 1 row k-1 of the flattened ``tile_features``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, cast

import numpy as np
from numpy.typing import NDArray

from bgevl.core.errors import CheckpointError, InputError
from bgevl.core.family import CANDIDATE, QUERY, Feeds, Preprocessor, Request, normalize_role
from bgevl.families.mllm.graphs import IMAGE_FEATURE_INDEX, IMAGE_TILES, NEWLINE_ROW, TEXT_POSITION
from bgevl.core.preprocessing import (
    DEFAULT_LIMITS, ImageInput, InputLimits, check_no_control_tokens, check_text, control_tokens, count_tokens, header_size,
    load_image, load_processor,
)
from bgevl.core.specs import ATTENTION_MASK, INPUT_IDS

if TYPE_CHECKING:  # pragma: no cover  (types only)
    from PIL import Image

log = logging.getLogger("bgevl")


#: BGE-VL-MLLM's ``data_process`` resizes every image to this size (width, height) first.
BGEVL_IMAGE_RESIZE = (512, 512)

#: The composed-image-retrieval instruction of BGE-VL-MLLM's model card and remote code.
CIR_INSTRUCTION = (
    "Retrieve the target image that best meets the combined criteria by using both the provided image "
    "and the image retrieval instructions: "
)


def build_prompt(text: str | None, has_image: bool, role: str, instruction: str | None) -> str:
    """BGE-VL-MLLM's prompt, character for character (``prepare_text_input`` in the remote code)."""
    if normalize_role(role) == QUERY:
        prompt = "[INST] \n <instruct>  <query>" if instruction is None else f"[INST] \n <instruct> {instruction} <query> "
        if text is not None:
            prompt = f"{prompt} {text} \n"
        if has_image:
            prompt = f"{prompt} <image>"
        return f"{prompt} [/INST]"
    prompt = "[INST] "
    if text is not None:
        prompt = f"{prompt} {text} \n"
    if has_image:
        prompt = f"{prompt} <image>"
    return f"{prompt} [/INST]"


@dataclass(frozen=True)
class ImageLayout:
    """What the anyres packing depends on, from the model config (recorded in the manifest)."""

    tile_size: int  # vision tower input size (336 for BGE-VL-MLLM)
    patch_size: int  # ViT patch (14)
    grid_pinpoints: tuple[tuple[int, int], ...]  # (height, width) resolutions of the tile grid
    image_token_id: int

    @property
    def grid(self) -> int:
        return self.tile_size // self.patch_size

    @property
    def tile_tokens(self) -> int:
        return self.grid * self.grid  # "default" feature selection: CLS dropped

    def to_json(self) -> dict[str, Any]:
        return {"tile_size": self.tile_size, "patch_size": self.patch_size,
                "grid_pinpoints": [list(p) for p in self.grid_pinpoints], "image_token_id": self.image_token_id}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ImageLayout":
        pinpoints = cast("tuple[tuple[int, int], ...]",
                         tuple(tuple(int(v) for v in p) for p in data["grid_pinpoints"]))
        return cls(int(data["tile_size"]), int(data["patch_size"]), pinpoints, int(data["image_token_id"]))

    @classmethod
    def from_config(cls, config: Any) -> "ImageLayout":
        if config.vision_feature_select_strategy != "default":
            raise ValueError(f"vision_feature_select_strategy {config.vision_feature_select_strategy!r} is not "
                             f"supported: LLaVA-NeXT's anyres packing assumes 'default' (CLS dropped)")
        vc = config.vision_config
        return cls(vc.image_size, vc.patch_size, tuple(tuple(p) for p in config.image_grid_pinpoints),
                   int(config.image_token_id))

    def num_tiles(self, height: int, width: int) -> int:
        grid_h, grid_w = self._grid_shape(height, width)
        return 1 + grid_h * grid_w

    def _grid_shape(self, height: int, width: int) -> tuple[int, int]:
        from transformers.image_processing_utils import select_best_resolution

        best_h, best_w = select_best_resolution((height, width), [list(p) for p in self.grid_pinpoints])
        return best_h // self.tile_size, best_w // self.tile_size

    def packed_rows(self, height: int, width: int) -> NDArray[Any]:
        """For one image of original size (height, width): the sequence of feature rows its image
        tokens take, as indices into that image's own tiles (``tile * tile_tokens + patch``), with
        -1 for the ``image_newline`` vector.

        A re-statement of transformers' ``LlavaNextModel.pack_image_features`` (with
        ``get_anyres_image_grid_shape`` and ``unpad_image``) on indices instead of features; that
        code is torch-only and moves features, where the graph needs the gather positions. The
        parity tests check it against transformers on several aspect ratios.
        """
        g, n = self.grid, self.tile_tokens
        base = np.arange(n, dtype=np.int64)
        grid_h, grid_w = self._grid_shape(height, width)
        if grid_h * grid_w == 0:
            return np.concatenate([base, [-1]])
        # feature map [grid_h*g, grid_w*g]: position (y, x) holds tile 1 + (y//g)*grid_w + x//g, patch (y%g)*g + x%g
        y = np.arange(grid_h * g)[:, None]
        x = np.arange(grid_w * g)[None, :]
        fmap = (1 + (y // g) * grid_w + x // g) * n + (y % g) * g + (x % g)
        cur_h, cur_w = fmap.shape
        if width / height > cur_w / cur_h:  # unpad_image: crop rows
            new_h = int(round(height * (cur_w / width), 7))
            pad = (cur_h - new_h) // 2
            fmap = fmap[pad:cur_h - pad, :]
        else:  # crop columns
            new_w = int(round(width * (cur_h / height), 7))
            pad = (cur_w - new_w) // 2
            fmap = fmap[:, pad:cur_w - pad]
        with_newline = np.concatenate([fmap, np.full((fmap.shape[0], 1), -1, dtype=np.int64)], axis=1)
        return np.concatenate([base, with_newline.reshape(-1)])


def complete_processor(processor: Any, config: Any, directory: Path) -> dict[str, Any]:
    """Fill the ``LlavaNextProcessor`` settings that older ``processor_config.json`` files lack, from the
    model config; returns what was filled.

    transformers 5 needs ``patch_size`` (else a ``TypeError`` inside the processor) and counts one image
    token too few unless ``num_additional_image_tokens`` is 1 for a vision tower with a CLS token: the
    key was added after 4.45 (transformers PR #33424), whose processor always counted the CLS. The
    BGE-VL-v1.5 wrappers set ``processor.patch_size = 14`` by hand for the same reason.
    """
    declared: dict[str, Any] = {}
    path = Path(directory) / "processor_config.json"
    if path.is_file():
        declared = json.loads(path.read_text(encoding="utf-8"))
    cls_tokens = 1 if config.vision_config.model_type in ("clip_vision_model", "clip") else 0
    wanted = {"patch_size": int(config.vision_config.patch_size),
              "vision_feature_select_strategy": config.vision_feature_select_strategy,
              "num_additional_image_tokens": cls_tokens}
    filled = {}
    for key, value in wanted.items():
        if declared.get(key) is None:
            setattr(processor, key, value)
            filled[key] = value
        elif declared[key] != value:
            raise CheckpointError(
                f"{path}: {key} is {declared[key]!r} but the model config needs {value!r} (the vision tower "
                f"{config.vision_config.model_type} with patch {config.vision_config.patch_size}); remove the key "
                f"or set it to {value!r}")
    return filled


def image_feature_index(input_ids: NDArray[Any], layout: ImageLayout,
                        image_sizes: Sequence[tuple[int, int]]) -> NDArray[Any]:
    """``image_feature_index`` [batch, sequence] for a tokenized batch.

    Images fill the ``<image>`` positions in row-major order over the batch, as transformers'
    ``masked_scatter`` does; ``image_sizes`` are the original (height, width) of the images in
    that order, and their tiles are laid out in the same order in ``tile_features``.
    """
    index = np.full(input_ids.shape, TEXT_POSITION, dtype=np.int64)
    rows, tile_offset = [], 0
    for height, width in image_sizes:
        local = layout.packed_rows(int(height), int(width))
        rows.append(np.where(local < 0, NEWLINE_ROW, tile_offset * layout.tile_tokens + local + 1))
        tile_offset += layout.num_tiles(int(height), int(width))
    flat = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    positions = input_ids == layout.image_token_id
    if int(positions.sum()) != len(flat):
        raise InputError(
            f"the prompts hold {int(positions.sum())} image-token positions but the images need {len(flat)}; "
            f"the processor's image-token count disagrees with the model's anyres layout (check that the "
            f"processor files belong to this checkpoint)"
        )
    index[positions] = flat
    return index


class MllmPreprocessor(Preprocessor):
    """Prompts, the checkpoint's ``LlavaNextProcessor`` and the image-feature index, for one batch."""

    def __init__(self, processor: Any, layout: ImageLayout, max_sequence: int,
                 resize: Sequence[int] | None = BGEVL_IMAGE_RESIZE, limits: InputLimits = DEFAULT_LIMITS):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.layout = layout
        self.max_sequence = max_sequence
        # (width, height): a pair from the manifest's recipe (a JSON list) or the caller
        self.resize = cast("tuple[int, int] | None", tuple(resize) if resize else None)
        self.image_model_size = self.resize
        self.limits = limits

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], layout: ImageLayout, max_sequence: int,
                        resize: Sequence[int] | None = BGEVL_IMAGE_RESIZE,
                        limits: InputLimits = DEFAULT_LIMITS) -> "MllmPreprocessor":
        return cls(load_processor(directory), layout, max_sequence, resize, limits)

    def prompts(self, images: Sequence[Any] | None, texts: Sequence[Any] | None, role: str,
                instruction: str | None, start: int = 0) -> list[str]:
        """``start``: index of the first item in the caller's list (error messages name items by it)."""
        if images is not None:
            n = len(images)
        elif texts is not None:
            n = len(texts)
        else:
            raise InputError("a request needs images, texts or both")
        role = normalize_role(role)
        tokens = control_tokens(self.tokenizer)
        if instruction is not None:
            check_text(instruction, "instruction", None, self.limits)
            check_no_control_tokens(instruction, tokens, "instruction")
        if role == QUERY and instruction is None:
            log.warning("MLLM query without a task instruction: BGE-VL-MLLM expects one for best results, e.g. "
                        "%r for composed image retrieval", CIR_INSTRUCTION)
        if role == CANDIDATE and instruction is not None:
            raise InputError("instruction applies to queries only; BGE-VL-MLLM's candidate prompt has none",
                             field="instruction")
        out = []
        for i in range(n):
            text = texts[i] if texts is not None else None
            image = images[i] if images is not None else None
            if text is not None:
                check_text(text, "text", start + i, self.limits, " (pass None for an image-only item)")
                check_no_control_tokens(text, tokens, "text", start + i)
            if text is None and image is None:
                raise InputError(f"item {start + i}: needs an image, a text or both")
            out.append(build_prompt(text, image is not None, role, instruction))
        return out

    def load_images(self, images: Sequence[ImageInput | None], start: int = 0) -> list[Image.Image]:
        """As BGE-VL-MLLM's ``data_process``: ``Image.open(p).resize((512, 512)).convert("RGB")``, resize
        *before* the RGB conversion (Pillow resizes palette images with NEAREST and RGBA premultiplied,
        so the order changes the pixels of P, RGBA and LA images)."""
        loaded = []
        for i, item in enumerate(images):
            if item is None:
                continue
            image = load_image(item, start + i, convert_rgb=False, limits=self.limits,
                               model_size=self.resize)
            if self.resize:
                image = image.resize(self.resize)
            loaded.append(image.convert("RGB"))
        return loaded

    def __call__(self, images: Sequence[ImageInput | None] | None, texts: Sequence[str | None] | None,
                 role: str = QUERY, instruction: str | None = None, start: int = 0) -> dict[str, NDArray[Any]]:
        """Feeds of both graphs for one batch: ``image_tiles`` (absent when no item has an image),
        ``input_ids``, ``attention_mask`` and ``image_feature_index``. ``start``: index of the batch's
        first item in the caller's list."""
        prompts = self.prompts(images, texts, role, instruction, start)
        pil = self.load_images(images, start) if images is not None else []
        kwargs: dict[str, Any] = {"text": prompts, "padding": True, "return_tensors": "np"}
        if pil:
            kwargs["images"] = pil
        enc = self.processor(**kwargs)
        input_ids = np.asarray(enc["input_ids"], dtype=np.int64)
        attention_mask = np.asarray(enc["attention_mask"], dtype=np.int64)
        lengths = attention_mask.sum(axis=1)
        over = [(i, int(n)) for i, n in enumerate(lengths) if n > self.max_sequence]
        if over:
            listed = ", ".join(f"item {start + i} ({n} tokens)" for i, n in over)
            raise InputError(
                f"{listed} over the exported sequence limit of {self.max_sequence} tokens (prompt plus image tokens); "
                f"shorten the text or re-export with a larger --max-sequence-length. Truncation is not applied: it "
                f"would cut the image tokens or the final [/INST] the embedding is read from"
            )
        feeds = {INPUT_IDS: input_ids, ATTENTION_MASK: attention_mask}
        sizes: list[tuple[int, int]] = []
        if pil:
            sizes = [(int(height), int(width)) for height, width in enc["image_sizes"]]
            pixel_values = np.asarray(enc["pixel_values"], dtype=np.float32)
            tiles = [pixel_values[i, :self.layout.num_tiles(*sizes[i])] for i in range(len(sizes))]
            feeds[IMAGE_TILES] = np.ascontiguousarray(np.concatenate(tiles))
        feeds[IMAGE_FEATURE_INDEX] = image_feature_index(input_ids, self.layout, sizes)
        return feeds

    def check(self, request: Request) -> Request:
        """The role defaults to ``query`` when an instruction is given, else ``candidate``."""
        role = normalize_role(request.role) if request.role is not None else (
            QUERY if request.instruction is not None else CANDIDATE)
        return replace(request, role=role)

    def text_lengths(self, request: Request, start: int = 0) -> list[tuple[int, int] | None]:
        """Each item's prompt tokens (with its BOS) plus its image's tokens (the anyres layout of the size the image
        is resized to, or of its header's size) against the exported sequence limit. An image whose header cannot
        be read counts none here: ``prepare`` refuses it in one line."""
        request = self.check(request)
        assert request.role is not None  # check() sets it
        lengths: list[tuple[int, int] | None] = []
        for i in range(len(request)):
            text = request.texts[i] if request.texts is not None else None
            image = request.images[i] if request.images is not None else None
            if text is None:
                lengths.append(None)
                continue
            tokens = count_tokens(self.tokenizer, build_prompt(text, image is not None, request.role, request.instruction))
            size = self.resize or (header_size(image) if image is not None else None)
            if image is not None and size is not None:
                width, height = size
                tokens += len(self.layout.packed_rows(height, width)) - 1  # the <image> placeholder becomes them
            lengths.append((tokens, self.max_sequence))
        return lengths

    def prepare(self, request: Request, start: int = 0, *, serving: bool = False) -> Feeds:
        request = self.check(request)
        assert request.role is not None  # check() sets it
        return self(request.images, request.texts, request.role, request.instruction, start)
