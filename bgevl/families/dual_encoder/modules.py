"""PyTorch modules that define a dual encoder's exported graphs: the checkpoint's own
``get_image_features`` / ``get_text_features`` (transformers' ``CLIPModel``, ``SiglipModel`` and their
kin: pooling and projection as the model defines them), then the L2 norm, inside the graph. Each also
returns the unnormalized features, which score fusion needs (``bgevl.families.dual_encoder.fusion``).
Validated against the family's independent reference (``bgevl.families.dual_encoder.reference``)."""

from __future__ import annotations

from typing import Any

import torch

from bgevl.core.specs import ATTENTION_MASK, INPUT_IDS, TextPadding
from bgevl.families.dual_encoder.graphs import TEXT_GRAPH, VISION_GRAPH


def pooled(output: Any) -> torch.Tensor:
    """The projected features of a ``get_*_features`` call: a tensor (transformers 4) or the output's
    ``pooler_output`` (transformers 5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ImageTower(torch.nn.Module):
    """pixel_values -> (image_embeds, image_features)."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = pooled(self.model.get_image_features(pixel_values=pixel_values))
        return torch.nn.functional.normalize(features, dim=-1), features


class MaskedTextTower(torch.nn.Module):
    """(input_ids, attention_mask) -> (text_embeds, text_features)."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = pooled(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))
        return torch.nn.functional.normalize(features, dim=-1), features


class UnmaskedTextTower(torch.nn.Module):
    """input_ids -> (text_embeds, text_features), for models trained without a text mask (SigLIP)."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = pooled(self.model.get_text_features(input_ids=input_ids))
        return torch.nn.functional.normalize(features, dim=-1), features


def dual_encoder_modules(model: Any, text: TextPadding) -> dict[str, torch.nn.Module]:
    """The vision and text modules; the text module's inputs are ``text.input_names`` in order."""
    tower = MaskedTextTower if text.input_names == (INPUT_IDS, ATTENTION_MASK) else UnmaskedTextTower
    return {VISION_GRAPH: ImageTower(model).eval(), TEXT_GRAPH: tower(model).eval()}
