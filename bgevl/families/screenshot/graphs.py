"""The screenshot family's graphs (BGE-VL-Screenshot, Qwen2.5-VL): names and declarations.

The vision graph runs on one image's patches at a time (any number: its grid follows the image's size), grouped
by the 2x2 merge block they form one image token with, so its one dynamic axis counts image tokens and the patch
count (4 x image tokens) follows from the shape. The language graph takes the image features of the whole batch
as a table; ``image_feature_index`` says which row fills each image-token position (-1: a text token).
"""

from __future__ import annotations

from typing import Any

from bgevl.core.specs import ATTENTION_MASK, INPUT_IDS, MASK_VALUES, Dim, GraphSpec, TensorSpec, batch_dim, token_ids

SCREENSHOT_VISION_GRAPH, SCREENSHOT_LANGUAGE_GRAPH = "screenshot_vision", "screenshot_language"
PIXEL_PATCHES, VISION_POSITIONS = "pixel_patches", "vision_positions"
WINDOW_SEGMENTS, IMAGE_SEGMENTS = "window_segments", "image_segments"
IMAGE_FEATURES, IMAGE_FEATURE_INDEX, ROPE_POSITIONS = "image_features", "image_feature_index", "rope_positions"
EMBEDDING, POOLED_HIDDEN = "embeds", "pooled_hidden"
#: Host-side feeds of a batch (not graph inputs): image tokens per image, in order, and where each image token
#: of the raster order sits among the vision graphs' outputs (window order, images concatenated)
IMAGE_TOKEN_COUNTS, IMAGE_RESTORE = "image_token_counts", "image_restore"

SCREENSHOT_OPT_BATCH, SCREENSHOT_MAX_BATCH = 2, 8


def screenshot_graph_specs(config: Any, *, max_pixels: int, opt_batch: int, max_batch: int,
                           max_sequence: int) -> dict[str, GraphSpec]:
    """The two graphs of a Qwen2.5-VL embedder from its ``Qwen2_5_VLConfig`` and the processor's pixel bound."""
    vc, tc = config.vision_config, config.text_config
    unit = vc.spatial_merge_size ** 2
    patch_values = vc.in_chans * vc.temporal_patch_size * vc.patch_size * vc.patch_size
    max_tokens = max(1, max_pixels // (vc.patch_size * vc.patch_size * unit))
    tokens = Dim("image_tokens", 1, min(max_tokens, 1024), max_tokens)
    batch = batch_dim(opt_batch, max_batch)
    seq = Dim("sequence", 1, min(max_sequence, 1024), max_sequence)
    rows = Dim("image_rows", 1, min(max_tokens, 1024) * min(opt_batch, max_batch), max_tokens * max_batch)
    vision = GraphSpec(
        SCREENSHOT_VISION_GRAPH,
        inputs=(
            TensorSpec(PIXEL_PATCHES, "float32", (tokens, unit, patch_values),
                       "the processor's pixel_values of one image (or of several, segments apart), in window order, "
                       f"grouped by merge block ({unit} patches of {patch_values} values per image token)"),
            TensorSpec(VISION_POSITIONS, "int64", (tokens, unit, 2), "each patch's (row, column) in its image's patch grid"),
            TensorSpec(WINDOW_SEGMENTS, "int64", (tokens,), "each image token's attention window (windowed blocks)"),
            TensorSpec(IMAGE_SEGMENTS, "int64", (tokens,), "each image token's image (full-attention blocks)"),
        ),
        outputs=(TensorSpec(IMAGE_FEATURES, "float32", (tokens, tc.hidden_size),
                            "merged image tokens in the input's window order, projected to the language model's width"),),
        description="Qwen2.5-VL vision tower: patch embedding -> windowed / full attention blocks (2-D rotary) -> "
                    "2x2 patch merger",
        splittable=False,  # an image's tokens attend to each other: never split a feed along them
    )
    language = GraphSpec(
        SCREENSHOT_LANGUAGE_GRAPH,
        inputs=(
            TensorSpec(INPUT_IDS, "int64", (batch, seq), "chat-template prompt ids, <|image_pad|> expanded per image",
                       token_ids(tc.vocab_size)),
            TensorSpec(ATTENTION_MASK, "int64", (batch, seq), "1 for tokens, 0 for padding", MASK_VALUES),
            TensorSpec(ROPE_POSITIONS, "int64", (3, batch, seq), "M-RoPE (temporal, row, column) positions"),
            TensorSpec(IMAGE_FEATURES, "float32", (rows, tc.hidden_size),
                       "the batch's image tokens in prompt order; one all-zero row when no item has an image"),
            TensorSpec(IMAGE_FEATURE_INDEX, "int64", (batch, seq), "-1: text token; k >= 0: image_features row k"),
        ),
        outputs=(
            TensorSpec(EMBEDDING, "float32", (batch, tc.hidden_size),
                       "L2-normalized final-norm hidden state of the last non-padding token"),
            TensorSpec(POOLED_HIDDEN, "float32", (batch, tc.hidden_size), "the same hidden state before normalization"),
        ),
        description="token embedding + image feature placement -> Qwen2.5 decoder (M-RoPE) -> final norm -> "
                    "last non-padding token -> L2 normalize; no LM head",
        normalized_output=(EMBEDDING, POOLED_HIDDEN),
    )
    return {SCREENSHOT_VISION_GRAPH: vision, SCREENSHOT_LANGUAGE_GRAPH: language}
