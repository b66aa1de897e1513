"""A real SigLIP dual encoder as a bgevl model family, as a package outside ``bgevl`` would ship it.

transformers' ``SiglipModel``: a ViT with a multi-head attention pooling head, a text transformer trained
on texts padded to a fixed 64 tokens *without* an attention mask and pooled at the last position, no
projection beyond the towers' own heads, no composed queries. Everything but two hooks comes from the
dual-encoder base (:class:`bgevl.families.dual_encoder.DualEncoderFamily`) and the declarations below;
the offline checkpoint has its own generated tokenizer (a WordLevel vocabulary with SigLIP's special
tokens, ``</s>`` appended and used as padding, ``input_ids`` only).

Registered through the entry-point group ``bgevl.families`` (``bgevl_siglip-0.1.dist-info`` beside it);
``tests/test_siglip_plugin.py`` runs it through every command with no file of ``bgevl/`` changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bgevl.core.family import IMAGE, TEXT, CheckpointKind
from bgevl.core.specs import ModelSpec, TextPadding
from bgevl.families.dual_encoder import DualEncoderFamily
from bgevl.families.dual_encoder.graphs import TowerShapes

TEXT_LENGTH = 64  # SigLIP's text positions; every text is padded to them
WORDS = ("a an the of and in on with photo picture image red green blue black white dog cat car bird tree "
         "house street beach sky water man woman child small large old new two three near under").split()


class SiglipFamily(DualEncoderFamily):
    name = "siglip"
    description = "SigLIP dual encoders (transformers' SiglipModel); images and texts, no composed queries"
    model_class = "SiglipModel"
    kinds = (IMAGE, TEXT)
    text_padding = TextPadding(fixed_length=TEXT_LENGTH, attention_mask=False)
    checkpoint_kind = CheckpointKind(
        "siglip", "SigLIP dual encoder (SiglipModel)", "SiglipConfig", (("tokenizer.json",),),
        ("vision_config.hidden_size", "vision_config.num_hidden_layers", "vision_config.patch_size",
         "vision_config.image_size", "text_config.hidden_size", "text_config.num_hidden_layers"))
    models = (
        ModelSpec(
            "tiny-siglip", "siglip", "small random-weight SigLIP (SiglipModel, 64 px, 16 px patches), generated offline",
            architecture={
                "text_config": {"vocab_size": 0, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                "num_attention_heads": 2, "max_position_embeddings": TEXT_LENGTH},
                "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                  "num_attention_heads": 2, "image_size": 64, "patch_size": 16},
            },
        ),
    )

    def tower_shapes(self, config: Any) -> TowerShapes:
        text = config.text_config
        return TowerShapes(int(config.vision_config.image_size), int(text.max_position_embeddings),
                           int(getattr(text, "projection_size", None) or text.hidden_size), int(text.vocab_size),
                           "vision tower: attention-pooling head -> L2 normalize",
                           "text tower: last position (fixed 64 tokens, no mask) -> head -> L2 normalize")

    def generate_checkpoint(self, spec: ModelSpec, directory: Path) -> Path:
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
        from transformers import (
            PreTrainedTokenizerFast, SiglipConfig, SiglipImageProcessorPil, SiglipModel, SiglipProcessor,
        )

        from bgevl.checkpoints import architecture_for, save_random_model

        vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
        backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        backend.normalizer = normalizers.Lowercase()
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
        backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="</s>",
                                            unk_token="<unk>", model_max_length=TEXT_LENGTH,
                                            model_input_names=["input_ids"])
        size = spec.architecture["vision_config"]["image_size"]
        processor = SiglipProcessor(image_processor=SiglipImageProcessorPil(size={"height": size, "width": size}),
                                    tokenizer=tokenizer)
        return save_random_model(SiglipModel, SiglipConfig(**architecture_for(spec, tokenizer)), processor, directory)
