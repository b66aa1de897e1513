"""The MLLM family's graphs (BGE-VL-MLLM, LLaVA-NeXT): names and declarations."""

from __future__ import annotations

from typing import Any

from bgevl.core.specs import (
    ATTENTION_MASK, DEFAULT_MAX_BATCH, DEFAULT_MAX_SEQUENCE, DEFAULT_OPT_BATCH, INPUT_IDS, MASK_VALUES, Dim, GraphSpec, TensorSpec, batch_dim,
    token_ids,
)


#: Graph and tensor names of the MLLM export. The image features enter the language graph as a
#: table; ``image_feature_index`` (computed during preprocessing from each image's size: anyres
#: grid, unpadding, ``image_newline`` positions) says which row fills each sequence position.
MLLM_VISION_GRAPH, MLLM_LANGUAGE_GRAPH = "mllm_vision", "mllm_language"
IMAGE_TILES, TILE_FEATURES = "image_tiles", "tile_features"
IMAGE_FEATURE_INDEX = "image_feature_index"
EMBEDDING, POOLED_HIDDEN = "embeds", "pooled_hidden"
#: Values of ``image_feature_index``: -1 = text token (use the token embedding), 0 = the
#: ``image_newline`` vector, k >= 1 = row k-1 of the flattened ``tile_features``.
TEXT_POSITION, NEWLINE_ROW = -1, 0

MLLM_OPT_BATCH, MLLM_MAX_BATCH = 2, 8


def mllm_graph_specs(
    *, tile_size: int, tile_tokens: int, hidden_size: int, vocab_size: int | None = None, max_sequence: int = DEFAULT_MAX_SEQUENCE,
    max_tiles_per_image: int = 5, opt_batch: int = DEFAULT_OPT_BATCH, max_batch: int = DEFAULT_MAX_BATCH,
) -> dict[str, GraphSpec]:
    """The two graphs of a LLaVA-NeXT embedder (see ``bgevl.families.mllm.modules``)."""
    batch = batch_dim(opt_batch, max_batch)
    tiles = Dim("tiles", 1, max_tiles_per_image * min(opt_batch, max_batch), max_tiles_per_image * max_batch)
    seq = Dim("sequence", 1, min(max_sequence, 3072), max_sequence)
    vision = GraphSpec(
        MLLM_VISION_GRAPH,
        inputs=(TensorSpec(IMAGE_TILES, "float32", (tiles, 3, tile_size, tile_size),
                           "anyres tiles of all images in the batch (base tile first per image), "
                           "CLIP-normalized, from the model's LlavaNextImageProcessor"),),
        outputs=(TensorSpec(TILE_FEATURES, "float32", (tiles, tile_tokens, hidden_size),
                            "vision tower hidden state at vision_feature_layer, CLS dropped, "
                            "through the multi-modal projector"),),
        description="vision tower (CLIP ViT) up to vision_feature_layer -> multi-modal projector",
    )
    language = GraphSpec(
        MLLM_LANGUAGE_GRAPH,
        inputs=(
            TensorSpec(INPUT_IDS, "int64", (batch, seq), "prompt token ids with <image> placeholders expanded",
                       token_ids(vocab_size)),
            TensorSpec(ATTENTION_MASK, "int64", (batch, seq), "1 for tokens, 0 for padding (left or right)", MASK_VALUES),
            TensorSpec(TILE_FEATURES, "float32", (tiles, tile_tokens, hidden_size),
                       "mllm_vision output; one all-zero tile when the batch has no image"),
            TensorSpec(IMAGE_FEATURE_INDEX, "int64", (batch, seq),
                       "-1: text token; 0: image_newline; k>=1: flattened tile_features row k-1"),
        ),
        outputs=(
            TensorSpec(EMBEDDING, "float32", (batch, hidden_size),
                       "L2-normalized last-layer hidden state of the last non-padding token"),
            TensorSpec(POOLED_HIDDEN, "float32", (batch, hidden_size),
                       "the same hidden state before normalization"),
        ),
        description="token embedding + image feature placement -> decoder -> final norm -> "
                    "last non-padding token (by attention mask) -> L2 normalize; no LM head",
        normalized_output=(EMBEDDING, POOLED_HIDDEN),
    )
    return {MLLM_VISION_GRAPH: vision, MLLM_LANGUAGE_GRAPH: language}


def mllm_graph_specs_from_config(config: Any, **kw: int) -> dict[str, GraphSpec]:
    """Graph specs from a transformers ``LlavaNextConfig``."""
    vc = config.vision_config
    grid = vc.image_size // vc.patch_size
    tile_tokens = grid * grid + (0 if config.vision_feature_select_strategy == "default" else 1)
    pinpoints = config.image_grid_pinpoints
    max_tiles = 1 + max((h // vc.image_size) * (w // vc.image_size) for h, w in pinpoints)
    return mllm_graph_specs(tile_size=vc.image_size, tile_tokens=tile_tokens, hidden_size=config.text_config.hidden_size,
                            vocab_size=config.text_config.vocab_size,
                            max_tiles_per_image=max_tiles, **kw)
