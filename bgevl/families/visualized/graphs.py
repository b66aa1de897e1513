"""The Visualized-BGE family's graphs: names and declarations.

The split point (``bgevl.families.visualized.modeling``): the vision graph ends after
``visual_proj`` (EVA-CLIP weights only); the text graph holds every text-model weight and adds the
image tokens' position embeddings and the embeddings' LayerNorm itself. The text graph takes the
image tokens of its items, or none (``image_tokens`` with 0 tokens: the plain text model).
"""

from __future__ import annotations

from bgevl.core.specs import (
    ATTENTION_MASK, INPUT_IDS, MASK_VALUES, PIXEL_VALUES, Dim, GraphSpec, TensorSpec, batch_dim, token_ids,
)

VISION_GRAPH, TEXT_GRAPH = "vision", "text"
#: vision graph output / text graph input: EVA tokens after ``visual_proj`` (the EVA CLS dropped)
IMAGE_TOKENS = "image_tokens"
#: text graph output: the L2-normalized CLS hidden state
EMBEDDING = "embeds"
#: text graph output: the CLS hidden state before the normalization (the fp16 pass keeps the norm in fp32)
CLS_HIDDEN = "cls_hidden"


def visualized_graph_specs(*, image_size: int, image_tokens: int, hidden: int, vocab_size: int | None = None, max_text_length: int,
                           opt_batch: int, max_batch: int) -> dict[str, GraphSpec]:
    batch = batch_dim(opt_batch, max_batch)
    seq = Dim("sequence", 1, min(16, max_text_length), max_text_length)
    # 0 image tokens: a text-only item; image_tokens: an image-only or composed item
    tokens = Dim("image_token_count", 0, image_tokens, image_tokens)
    vision = GraphSpec(
        VISION_GRAPH,
        inputs=(TensorSpec(PIXEL_VALUES, "float32", (batch, 3, image_size, image_size),
                           "OpenAI-CLIP-normalized RGB pixels: bicubic shorter-side resize, center crop (EVA-CLIP transform)"),),
        outputs=(TensorSpec(IMAGE_TOKENS, "float32", (batch, image_tokens, hidden),
                            "EVA-CLIP patch tokens of the last block (no final norm, EVA CLS dropped) -> visual_proj"),),
        description="EVA02-CLIP vision tower (2D rotary, SwiGLU, sub-LayerNorm) -> visual_proj",
    )
    text = GraphSpec(
        TEXT_GRAPH,
        inputs=(
            TensorSpec(INPUT_IDS, "int64", (batch, seq), "BGE token ids, [CLS] ... [SEP] (the empty prompt for images)",
                       token_ids(vocab_size)),
            TensorSpec(ATTENTION_MASK, "int64", (batch, seq), "1 for tokens, 0 for padding (right padding)", MASK_VALUES),
            TensorSpec(IMAGE_TOKENS, "float32", (batch, tokens, hidden),
                       "the vision graph's image tokens, or 0 tokens for text-only items"),
        ),
        outputs=(TensorSpec(EMBEDDING, "float32", (batch, hidden), "L2-normalized CLS hidden state"),
                 TensorSpec(CLS_HIDDEN, "float32", (batch, hidden), "CLS hidden state of the last layer, unnormalized")),
        description="BGE text encoder over [CLS] + image tokens + text[1:] (Visualized-BGE encode_mm), or the text "
                    "alone (encode_text); CLS pooling, L2 normalize",
        normalized_output=(EMBEDDING, CLS_HIDDEN),
    )
    return {VISION_GRAPH: vision, TEXT_GRAPH: text}
