"""The CLIP family's graphs (BGE-VL-base / -large): names and declarations."""

from __future__ import annotations

from typing import Any

from bgevl.core.specs import (
    ATTENTION_MASK, DEFAULT_MAX_BATCH, DEFAULT_OPT_BATCH, INPUT_IDS, MASK_VALUES, PIXEL_VALUES, Dim, GraphSpec, TensorSpec, batch_dim,
    token_ids,
)


#: Output names. ``*_embeds`` are L2-normalized (what retrieval uses); ``*_features`` are the
#: unnormalized projections, which score fusion needs (see ``bgevl.families.clip.fusion``).
IMAGE_EMBEDS, IMAGE_FEATURES = "image_embeds", "image_features"
TEXT_EMBEDS, TEXT_FEATURES = "text_embeds", "text_features"
VISION_GRAPH, TEXT_GRAPH = "vision", "text"


def clip_graph_specs(
    *, image_size: int, max_text_length: int, embed_dim: int, vocab_size: int | None = None,
    opt_batch: int = DEFAULT_OPT_BATCH, max_batch: int = DEFAULT_MAX_BATCH,
) -> dict[str, GraphSpec]:
    """The two graphs of a CLIP dual encoder, with projection and L2 norm inside the graph."""
    batch = batch_dim(opt_batch, max_batch)
    seq = Dim("sequence", 1, min(16, max_text_length), max_text_length)
    vision = GraphSpec(
        VISION_GRAPH,
        inputs=(TensorSpec(PIXEL_VALUES, "float32", (batch, 3, image_size, image_size),
                           "CLIP-normalized RGB pixels from the model's CLIPImageProcessor"),),
        outputs=(
            TensorSpec(IMAGE_EMBEDS, "float32", (batch, embed_dim), "L2-normalized image embedding"),
            TensorSpec(IMAGE_FEATURES, "float32", (batch, embed_dim),
                       "unnormalized projected image features (input of score fusion)"),
        ),
        description="vision tower: CLS after post_layernorm -> visual_projection -> L2 normalize",
        normalized_output=(IMAGE_EMBEDS, IMAGE_FEATURES),
    )
    text = GraphSpec(
        TEXT_GRAPH,
        inputs=(
            TensorSpec(INPUT_IDS, "int64", (batch, seq), "CLIP BPE token ids, <|startoftext|> ... <|endoftext|>",
                       token_ids(vocab_size)),
            TensorSpec(ATTENTION_MASK, "int64", (batch, seq), "1 for tokens, 0 for padding", MASK_VALUES),
        ),
        outputs=(
            TensorSpec(TEXT_EMBEDS, "float32", (batch, embed_dim), "L2-normalized text embedding"),
            TensorSpec(TEXT_FEATURES, "float32", (batch, embed_dim),
                       "unnormalized projected text features (input of score fusion)"),
        ),
        description="text tower: EOS-token pooling after final_layer_norm -> text_projection -> L2 normalize",
        normalized_output=(TEXT_EMBEDS, TEXT_FEATURES),
    )
    return {VISION_GRAPH: vision, TEXT_GRAPH: text}


def clip_graph_specs_from_config(config: Any, **batch: int) -> dict[str, GraphSpec]:
    """Graph specs from a transformers ``CLIPConfig``."""
    return clip_graph_specs(
        image_size=config.vision_config.image_size,
        max_text_length=config.text_config.max_position_embeddings,
        embed_dim=config.projection_dim,
        vocab_size=config.text_config.vocab_size,
        **batch,
    )
