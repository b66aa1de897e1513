"""PyTorch modules that define the exported CLIP graphs (validated against ``bgevl.families.clip.reference``).

Each module puts the projection and the L2 normalization inside the graph and also returns the
unnormalized projection, which score fusion needs (``bgevl.families.clip.fusion``).
"""

from __future__ import annotations

from typing import Any

import torch

from bgevl.families.clip.graphs import TEXT_GRAPH, VISION_GRAPH


class VisionEmbedding(torch.nn.Module):
    """pixel_values -> (image_embeds, image_features); ``CLIPModel.get_image_features`` + L2 norm."""

    def __init__(self, clip: Any):
        super().__init__()
        self.vision_model = clip.vision_model
        self.visual_projection = clip.visual_projection

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output  # CLS after post_layernorm
        features = self.visual_projection(pooled)
        return torch.nn.functional.normalize(features, dim=-1), features


class TextEmbedding(torch.nn.Module):
    """(input_ids, attention_mask) -> (text_embeds, text_features); EOS pooling + projection + L2 norm."""

    def __init__(self, clip: Any):
        super().__init__()
        self.text_model = clip.text_model
        self.text_projection = clip.text_projection

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        features = self.text_projection(pooled)
        return torch.nn.functional.normalize(features, dim=-1), features


def graph_modules(clip: Any) -> dict[str, torch.nn.Module]:
    return {VISION_GRAPH: VisionEmbedding(clip).eval(), TEXT_GRAPH: TextEmbedding(clip).eval()}
