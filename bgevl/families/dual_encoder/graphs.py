"""The two graphs of a dual encoder (an image tower and a text tower into one space): names and the
declaration every dual-encoder family's graphs are derived from."""

from __future__ import annotations

from dataclasses import dataclass

from bgevl.core.specs import (
    ATTENTION_MASK, DEFAULT_MAX_BATCH, DEFAULT_OPT_BATCH, INPUT_IDS, MASK_VALUES, PIXEL_VALUES, Dim, GraphSpec,
    TensorSpec, TextPadding, batch_dim, token_ids,
)

#: Output names. ``*_embeds`` are L2-normalized (what retrieval uses); ``*_features`` are the
#: unnormalized projections, which score fusion needs (see ``bgevl.families.dual_encoder.fusion``).
IMAGE_EMBEDS, IMAGE_FEATURES = "image_embeds", "image_features"
TEXT_EMBEDS, TEXT_FEATURES = "text_embeds", "text_features"
VISION_GRAPH, TEXT_GRAPH = "vision", "text"


@dataclass(frozen=True)
class TowerShapes:
    """What a dual encoder's graphs need to know of its checkpoint's config (``DualEncoderFamily.tower_shapes``)."""

    image_size: int  # square input images, after the image processor's resize and crop
    max_text_length: int  # the text tower's positions
    embed_dim: int  # width of the shared space
    vocab_size: int | None = None  # token ids must be below it (None: not checked)
    vision_description: str = "vision tower: pooled image features -> L2 normalize"
    text_description: str = "text tower: pooled text features -> L2 normalize"


def dual_encoder_graph_specs(shapes: TowerShapes, text: TextPadding = TextPadding(), *,
                             opt_batch: int = DEFAULT_OPT_BATCH, max_batch: int = DEFAULT_MAX_BATCH) -> dict[str, GraphSpec]:
    """The vision and text graphs, pooling, projection and L2 norm inside the graph. The text inputs follow
    ``text``: a fixed-length sequence axis and no mask where the model is padded to a fixed length."""
    batch = batch_dim(opt_batch, max_batch)
    length = shapes.max_text_length
    seq: int | Dim = text.fixed_length if text.fixed_length else Dim("sequence", 1, min(16, length), length)
    size = shapes.image_size
    vision = GraphSpec(
        VISION_GRAPH,
        inputs=(TensorSpec(PIXEL_VALUES, "float32", (batch, 3, size, size),
                           "normalized RGB pixels from the checkpoint's image processor"),),
        outputs=(
            TensorSpec(IMAGE_EMBEDS, "float32", (batch, shapes.embed_dim), "L2-normalized image embedding"),
            TensorSpec(IMAGE_FEATURES, "float32", (batch, shapes.embed_dim),
                       "unnormalized projected image features (input of score fusion)"),
        ),
        description=shapes.vision_description,
        normalized_output=(IMAGE_EMBEDS, IMAGE_FEATURES),
    )
    text_inputs = {
        INPUT_IDS: TensorSpec(INPUT_IDS, "int64", (batch, seq), "token ids from the checkpoint's tokenizer",
                              token_ids(shapes.vocab_size)),
        ATTENTION_MASK: TensorSpec(ATTENTION_MASK, "int64", (batch, seq), "1 for tokens, 0 for padding", MASK_VALUES),
    }
    text_graph = GraphSpec(
        TEXT_GRAPH,
        inputs=tuple(text_inputs[name] for name in text.input_names),
        outputs=(
            TensorSpec(TEXT_EMBEDS, "float32", (batch, shapes.embed_dim), "L2-normalized text embedding"),
            TensorSpec(TEXT_FEATURES, "float32", (batch, shapes.embed_dim),
                       "unnormalized projected text features (input of score fusion)"),
        ),
        description=shapes.text_description,
        normalized_output=(TEXT_EMBEDS, TEXT_FEATURES),
    )
    return {VISION_GRAPH: vision, TEXT_GRAPH: text_graph}
