"""The CLIP family: BGE-VL-base / -large, CLIP dual encoders; a composed query is score fusion.

A :class:`~bgevl.families.dual_encoder.DualEncoderFamily` on transformers' ``CLIPModel``. Files:
``graphs`` (CLIP's shapes of the dual encoder's graphs), ``checkpoint`` (the offline generator and its
tokenizer), ``reference`` (the original's fp32 embeddings, as BGE-VL's remote code computes them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from bgevl.core.family import CheckpointKind, Original
from bgevl.core.specs import ModelSpec
from bgevl.families.clip.graphs import clip_tower_shapes
from bgevl.families.dual_encoder import DualEncoderFamily
from bgevl.families.dual_encoder.graphs import TowerShapes


def _clip_arch(*, text_width: int, text_layers: int, text_heads: int, vision_width: int,
               vision_layers: int, vision_heads: int, patch: int, image_size: int, proj: int,
               vocab_size: int = 49408) -> dict[str, Any]:
    return {
        "text_config": {
            "vocab_size": vocab_size, "hidden_size": text_width, "intermediate_size": 4 * text_width,
            "num_hidden_layers": text_layers, "num_attention_heads": text_heads,
            "max_position_embeddings": 77, "hidden_act": "quick_gelu",
        },
        "vision_config": {
            "hidden_size": vision_width, "intermediate_size": 4 * vision_width,
            "num_hidden_layers": vision_layers, "num_attention_heads": vision_heads,
            "image_size": image_size, "patch_size": patch, "hidden_act": "quick_gelu",
        },
        "projection_dim": proj,
    }



MODELS = (

    ModelSpec(
        "tiny", "clip",
        "small random-weight CLIP (same architecture as BGE-VL-base, 2 layers, width 32), generated offline",
        architecture=_clip_arch(text_width=32, text_layers=2, text_heads=2, vision_width=32,
                                vision_layers=2, vision_heads=2, patch=32, image_size=224, proj=16,
                                vocab_size=0),  # vocab size comes from the generated tokenizer
    ),
    ModelSpec(
        "base", "clip", "BAAI/BGE-VL-base: CLIP ViT-B/16 dual encoder (150M parameters)",
        hub_id="BAAI/BGE-VL-base",
        architecture=_clip_arch(text_width=512, text_layers=12, text_heads=8, vision_width=768,
                                vision_layers=12, vision_heads=12, patch=16, image_size=224, proj=512),
    ),
    ModelSpec(
        "large", "clip", "BAAI/BGE-VL-large: CLIP ViT-L/14 dual encoder (428M parameters)",
        hub_id="BAAI/BGE-VL-large",
        architecture=_clip_arch(text_width=768, text_layers=12, text_heads=12, vision_width=1024,
                                vision_layers=24, vision_heads=16, patch=14, image_size=224, proj=768),
    ),
)

class ClipFamily(DualEncoderFamily):
    name = "clip"
    description = "CLIP dual encoders (BGE-VL-base, BGE-VL-large); composed queries by score fusion"
    models = MODELS
    model_class = "CLIPModel"
    checkpoint_kind = CheckpointKind(
        "clip", "CLIP dual encoder (CLIPModel)", "CLIPConfig",
        (("tokenizer.json",), ("vocab.json", "merges.txt")),
        ("vision_config.hidden_size", "vision_config.num_hidden_layers", "vision_config.patch_size",
         "vision_config.image_size", "text_config.hidden_size", "text_config.num_hidden_layers", "projection_dim"),
    )

    def tower_shapes(self, config: Any) -> TowerShapes:
        return clip_tower_shapes(config)

    def generate_checkpoint(self, spec: ModelSpec, directory: Path) -> Path:
        from bgevl.families.clip.checkpoint import generate_clip_checkpoint

        return generate_clip_checkpoint(spec, directory)

    def original(self, path: Path, recipe: Mapping[str, Any] | None = None) -> Original:
        from bgevl.families.clip.reference import OriginalClip

        return OriginalClip(path)
