"""The CLIP family's graphs (BGE-VL-base / -large): the dual encoder's two graphs with CLIP's shapes."""

from __future__ import annotations

from typing import Any

from bgevl.core.specs import DEFAULT_MAX_BATCH, DEFAULT_OPT_BATCH, GraphSpec
from bgevl.families.dual_encoder.graphs import TowerShapes, dual_encoder_graph_specs


VISION_DESCRIPTION = "vision tower: CLS after post_layernorm -> visual_projection -> L2 normalize"
TEXT_DESCRIPTION = "text tower: EOS-token pooling after final_layer_norm -> text_projection -> L2 normalize"


def clip_tower_shapes(config: Any) -> TowerShapes:
    """The graphs' shapes from a transformers ``CLIPConfig``."""
    return TowerShapes(
        image_size=int(config.vision_config.image_size),
        max_text_length=int(config.text_config.max_position_embeddings),
        embed_dim=int(config.projection_dim),
        vocab_size=int(config.text_config.vocab_size),
        vision_description=VISION_DESCRIPTION, text_description=TEXT_DESCRIPTION,
    )


def clip_graph_specs(
    *, image_size: int, max_text_length: int, embed_dim: int, vocab_size: int | None = None,
    opt_batch: int = DEFAULT_OPT_BATCH, max_batch: int = DEFAULT_MAX_BATCH,
) -> dict[str, GraphSpec]:
    """The two graphs of a CLIP dual encoder, with projection and L2 norm inside the graph."""
    shapes = TowerShapes(image_size, max_text_length, embed_dim, vocab_size, VISION_DESCRIPTION, TEXT_DESCRIPTION)
    return dual_encoder_graph_specs(shapes, opt_batch=opt_batch, max_batch=max_batch)
