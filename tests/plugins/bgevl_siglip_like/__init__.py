"""A fourth model family, as a package outside ``bgevl`` would ship it: a SigLIP-like dual encoder.

It is BGE-VL's CLIP dual encoder with another image size (64 px, 16 px patches) and a SigLIP-style
image processor (resize to a square without a center crop, mean and std 0.5), so it subclasses the
dual-encoder base (:class:`bgevl.families.clip.ClipFamily`) and overrides what differs: its models
and how its offline checkpoint is written. It registers through the entry-point group
``bgevl.families`` (``bgevl_siglip_like-0.1.dist-info/entry_points.txt`` beside it), and adds one
``bgevl-export`` option of its own, which it records in the manifest.

``tests/test_plugin_family.py`` exports, validates and serves it with no file of ``bgevl/`` changed.
"""

from __future__ import annotations

from pathlib import Path

from bgevl.core.specs import ModelSpec
from bgevl.families.clip import ClipFamily

IMAGE_SIZE = 64
PATCH = 16


class SiglipLikeFamily(ClipFamily):
    name = "siglip-like"
    description = "SigLIP-like dual encoder (test plug-in): CLIP towers, 64 px square resize, mean/std 0.5"
    models = (
        ModelSpec(
            "tiny-siglip-like", "siglip-like",
            "small random-weight SigLIP-like dual encoder (64 px images, 16 px patches), generated offline",
            architecture={
                "text_config": {"vocab_size": 0, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                "num_attention_heads": 2, "max_position_embeddings": 64, "hidden_act": "gelu"},
                "vision_config": {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
                                  "num_attention_heads": 2, "image_size": IMAGE_SIZE, "patch_size": PATCH,
                                  "hidden_act": "gelu"},
                "projection_dim": 24,
            },
        ),
    )

    def add_export_arguments(self, group) -> None:
        group.add_argument("--siglip-note", default="none", help="a free-text note recorded in the manifest")

    def generate_checkpoint(self, spec: ModelSpec, directory: Path) -> Path:
        from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

        from bgevl.checkpoints import architecture_for, save_random_model
        from bgevl.families.clip.checkpoint import generated_tokenizer

        tokenizer = generated_tokenizer()
        tokenizer.model_max_length = spec.architecture["text_config"]["max_position_embeddings"]
        processor = CLIPProcessor(
            image_processor=CLIPImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_center_crop=False,
                                                  image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]),
            tokenizer=tokenizer,
        )
        return save_random_model(CLIPModel, CLIPConfig(**architecture_for(spec, tokenizer)), processor, directory)

    def prepare_export(self, path, spec, options):
        exported = super().prepare_export(path, spec, options)
        exported.details["siglip_note"] = options.family_options.get("siglip_note")
        return exported
