"""What Qwen2.5-VL computes on the host from each image's patch grid and each prompt, in numpy (the runtime
needs no torch): the vision tower's window order, rotary positions and attention segments of one image, and
the language model's 3-D (M-RoPE) positions of a batch of prompts.

Existing exporters do the same outside their graphs (onnxruntime-genai ``qwen_vl_vision.cpp`` and
``position_inputs.cpp``, optimum-intel ``modeling_visual_language.py``, vLLM ``qwen2_5_vl.py``): these
quantities depend on the grid by loops and data-dependent shapes that a graph cannot hold. They follow
transformers' ``vision_utils.get_vision_position_ids`` / ``get_vision_window_index`` and
``Qwen2_5_VLModel.get_rope_index``; ``tests/test_screenshot.py`` checks them against those functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class VisionGeometry:
    """The vision tower's constants from ``config.json``'s ``vision_config``."""

    patch_size: int
    merge_size: int
    window_size: int  # pixels

    @property
    def merge_unit(self) -> int:
        return self.merge_size * self.merge_size

    @property
    def window_tokens(self) -> int:
        """A window's side in merged tokens (112 px / 14 / 2 = 4 for Qwen2.5-VL)."""
        return self.window_size // self.merge_size // self.patch_size

    @classmethod
    def from_config(cls, vision_config: Any) -> "VisionGeometry":
        return cls(int(vision_config.patch_size), int(vision_config.spatial_merge_size), int(vision_config.window_size))

    def to_json(self) -> dict[str, int]:
        return {"patch_size": self.patch_size, "merge_size": self.merge_size, "window_size": self.window_size}


@dataclass(frozen=True)
class ImageLayout:
    """One image's vision-graph feeds in window order, and how to put the merged tokens back in raster order.

    ``order``: patch rows of the processor's ``pixel_values`` in window order; ``positions``: each (window-ordered)
    patch's (row, column) in the patch grid, for the 2-D rotary embedding, ``[image tokens, 4, 2]``; ``windows``:
    each image token's window id (attention stays inside a window in the windowed blocks); ``restore``: the
    merged token of the graph's output that holds each raster-order image token."""

    order: NDArray[np.int64]
    positions: NDArray[np.int64]
    windows: NDArray[np.int64]
    restore: NDArray[np.int64]

    @property
    def tokens(self) -> int:
        return len(self.restore)


def image_layout(grid_thw: tuple[int, int, int], geometry: VisionGeometry) -> ImageLayout:
    t, h, w = (int(v) for v in grid_thw)
    m, unit, win = geometry.merge_size, geometry.merge_unit, geometry.window_tokens
    # rotary positions of the patches in the processor's order: 2x2 merge blocks contiguous (block-major)
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    blocks = (h // m, m, w // m, m)
    raster = np.stack([rows.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1),
                       cols.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)], axis=-1)
    raster = np.tile(raster, (t, 1))
    # merged tokens grouped window by window (windows of win x win merged tokens, the last ones cut at the edge)
    gh, gw = h // m, w // m
    index = np.arange(t * gh * gw).reshape(t, gh, gw)
    nh, nw = -(-gh // win), -(-gw // win)
    padded = np.full((t, nh * win, nw * win), -1, np.int64)
    padded[:, :gh, :gw] = index
    padded = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t * nh * nw, win * win)
    token_window = np.repeat(np.arange(len(padded)), (padded >= 0).sum(axis=1))
    merged_order = padded[padded >= 0]
    order = (merged_order[:, None] * unit + np.arange(unit)[None, :]).reshape(-1)
    # renumber the windows 0.. in order (empty ones dropped): ids only need to tell windows apart
    windows = np.unique(token_window, return_inverse=True)[1].astype(np.int64)
    return ImageLayout(order.astype(np.int64), raster[order].reshape(len(merged_order), unit, 2).astype(np.int64),
                       windows, np.argsort(merged_order).astype(np.int64))


def rope_positions(input_ids: NDArray[Any], attention_mask: NDArray[Any], grids: list[tuple[int, int, int]],
                   image_token_id: int, merge_size: int) -> NDArray[np.int64]:
    """The language model's ``[3, batch, sequence]`` M-RoPE positions: text tokens count up on all three rows;
    an image's tokens share the temporal position at its start and take its start plus their merged row and
    column; the text after it continues at the start plus the larger side. Padding positions hold 1 (they are
    masked). ``grids``: the batch's images in order of appearance."""
    batch, seq = input_ids.shape
    out = np.ones((3, batch, seq), np.int64)
    images = iter(grids)
    for b in range(batch):
        real = np.flatnonzero(attention_mask[b] > 0)
        ids = input_ids[b, real]
        columns = []
        pos, i = 0, 0
        while i < len(ids):
            if ids[i] != image_token_id:
                j = i
                while j < len(ids) and ids[j] != image_token_id:
                    j += 1
                columns.append(np.broadcast_to(np.arange(pos, pos + j - i), (3, j - i)))
                pos += j - i
                i = j
                continue
            t, h, w = next(images)
            gh, gw = h // merge_size, w // merge_size
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            columns.append(np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + pos)
            i += t * gh * gw
            pos += max(gh, gw)
        out[:, b, real] = np.concatenate(columns, axis=1) if columns else np.zeros((3, 0), np.int64)
    return out
