"""Small generated checkpoints laid out the way the BGE-VL hub repositories publish theirs.

The exporter's own generator (``bgevl.checkpoints``) writes what transformers 5 ``save_pretrained``
writes: float32 weights, a nested ``processor_config.json``, current names. Real users have the hub
files instead (the hub repositories BAAI/BGE-VL-base, -large and -MLLM-S1: their ``config.json``,
``*.safetensors`` headers and processor files), and those differ in every point that
matters to loading, so the tests that stand for a user's checkpoint use these:

* BGE-VL-base / -large: ``config.json`` (``model_type`` clip, ``architectures`` ["CLIPModel"],
  ``auto_map`` to the remote ``modeling_MMRet_CLIP.CLIPModel``, ``torch_dtype`` float16, OpenAI's
  legacy text ``eos_token_id`` 2, which selects the ``argmax(input_ids)`` pooling branch),
  ``model.safetensors`` in **16 bits** with the standard CLIPModel names (no prefix, no
  ``position_ids``), ``vocab.json``, ``merges.txt``, ``tokenizer.json``, ``tokenizer_config.json``,
  ``special_tokens_map.json`` and the legacy 316-byte ``preprocessor_config.json`` (only
  ``feature_extractor_type`` CLIPFeatureExtractor, no ``image_processor_type``).
* BGE-VL-MLLM-S1/-S2, v1.5: **four 16-bit shards with an index** in transformers 4.45's
  ``LlavaNextForConditionalGeneration`` names (``language_model.model.*``, ``language_model.lm_head``,
  ``vision_tower.vision_model.*``, ``multi_modal_projector.*``, ``image_newline``), a 4.45-style
  ``config.json`` (``rope_theta``, ``auto_map`` to ``LLaVANextForEmbedding``), ``added_tokens.json``
  with ``<image>``, ``<pad>``, ``<instruct>``, ``<query>``, a legacy ``preprocessor_config.json``,
  ``chat_template.jinja``, ``generation_config.json`` and a ``processor_config.json`` in one of three
  variants: ``llava-hf`` (with ``num_additional_image_tokens: 1``), ``4.45`` (without it) or ``none``
  (no file, so no ``patch_size``).

Not reproduced: ``tokenizer.model`` (a SentencePiece model needs the sentencepiece trainer; the hub
repositories ship ``tokenizer.json`` too, which is what transformers 5 reads) and the remote-code
files' contents (a placeholder stands in; nothing here runs remote code).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from bgevl.checkpoints import GENERATED_SEED, architecture_for
from bgevl.core.registry import get_model_spec
from bgevl.families.clip import _clip_arch
from bgevl.families.clip.checkpoint import _TINY_MERGES, generated_tokenizer
from bgevl.families.mllm.checkpoint import generated_llama_tokenizer, generated_mllm_config
from bgevl.core.specs import ModelSpec

#: OpenAI's legacy CLIP preprocessor file, as BGE-VL-base/-large ship it (316 bytes).
LEGACY_CLIP_PREPROCESSOR = {
    "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3, "size": 224,
}

#: Tiny CLIP architectures shaped like BGE-VL-base (ViT-B/16: patch 16) and BGE-VL-large (ViT-L/14:
#: patch 14, wider towers and projection).
CLIP_LIKE = {
    "base": _clip_arch(text_width=32, text_layers=2, text_heads=2, vision_width=32, vision_layers=2, vision_heads=2,
                       patch=16, image_size=224, proj=16, vocab_size=0),
    "large": _clip_arch(text_width=48, text_layers=2, text_heads=4, vision_width=64, vision_layers=3, vision_heads=4,
                        patch=14, image_size=224, proj=24, vocab_size=0),
}

PROCESSOR_VARIANTS = ("llava-hf", "4.45", "none")


def _seeded(model_class, config):
    with torch.random.fork_rng():
        torch.manual_seed(GENERATED_SEED)
        return model_class(config).eval()


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _config_as_saved_by_4_45(config, **extra) -> dict:
    data = config.to_dict()
    data.pop("dtype", None)
    data.update(transformers_version="4.45.2", **extra)
    return data


def clip_hub_checkpoint(directory: Path, like: str = "base", dtype: torch.dtype = torch.float16,
                        architecture: dict | None = None) -> Path:
    """A random-weight CLIP in the BGE-VL-base/-large hub layout: tiny and shaped ``like`` base or
    large, or of ``architecture`` (a ModelSpec's, for the full-size models)."""
    from transformers import CLIPConfig, CLIPModel

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = generated_tokenizer()
    arch = architecture or CLIP_LIKE[like]
    config = CLIPConfig(**architecture_for(ModelSpec(f"hub-{like}", "clip", "", architecture=arch), tokenizer))
    model = _seeded(CLIPModel, config)
    tensors = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    data = _config_as_saved_by_4_45(config, architectures=["CLIPModel"], auto_map={"AutoModel": "modeling_MMRet_CLIP.CLIPModel"},
                                    torch_dtype=str(dtype).removeprefix("torch."))
    # OpenAI's CLIP configs (and so BGE-VL's) carry the legacy text ids bos 0 / eos 2 / pad 1, which
    # select CLIP's argmax(input_ids) EOS pooling in transformers; the vocabulary's EOS is its largest id
    data["text_config"].update(bos_token_id=0, eos_token_id=2, pad_token_id=1)
    _write_json(directory / "config.json", data)
    tokenizer.save_pretrained(directory)
    _write_json(directory / "vocab.json", tokenizer.get_vocab())
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _TINY_MERGES))
    _write_json(directory / "special_tokens_map.json", {
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>"})
    (directory / "preprocessor_config.json").write_text(json.dumps(LEGACY_CLIP_PREPROCESSOR, indent=2, sort_keys=True) + "\n")
    (directory / "modeling_MMRet_CLIP.py").write_text("# placeholder of the hub's remote code (not run by bgevl-export)\n")
    return directory


#: transformers 5 module names -> transformers 4.45 LlavaNextForConditionalGeneration names (the hub files)
_TO_4_45 = (
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^model\.vision_tower\.", "vision_tower.vision_model."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    (r"^model\.image_newline$", "image_newline"),
)


def _name_4_45(key: str) -> str:
    for pattern, replacement in _TO_4_45:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    raise AssertionError(f"no 4.45 name for {key}")


def mllm_tokenizer():
    """The generated Llama-style tokenizer plus BGE-VL-MLLM's added ``<instruct>`` and ``<query>`` tokens."""
    from tokenizers import AddedToken

    tokenizer = generated_llama_tokenizer()
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in ("<instruct>", "<query>")],
                         special_tokens=True)
    return tokenizer


def mllm_hub_checkpoint(directory: Path, processor_config: str = "4.45", dtype: torch.dtype = torch.bfloat16,
                        shards: int = 4) -> Path:
    """A random-weight tiny LLaVA-NeXT embedder in the BGE-VL-MLLM hub layout."""
    from transformers import LlavaNextForConditionalGeneration

    assert processor_config in PROCESSOR_VARIANTS
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = mllm_tokenizer()
    config = generated_mllm_config(get_model_spec("tiny-mllm"), tokenizer)
    model = _seeded(LlavaNextForConditionalGeneration, config)
    tensors = {_name_4_45(k): v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    names = sorted(tensors)
    weight_map, total = {}, 0
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[i::shards]}
        save_file(part, str(directory / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
        total += sum(v.numel() * v.element_size() for v in part.values())
    _write_json(directory / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})

    data = _config_as_saved_by_4_45(config, architectures=["LLaVANextForEmbedding"],
                                    auto_map={"AutoModel": "modeling_llavanext_for_embedding.LLaVANextForEmbedding"},
                                    torch_dtype=str(dtype).removeprefix("torch."))
    text = data["text_config"]  # 4.45 wrote rope_theta, not rope_parameters
    text["rope_theta"] = text.pop("rope_parameters")["rope_theta"]
    _write_json(directory / "config.json", data)
    _write_json(directory / "generation_config.json", {
        "_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "transformers_version": "4.45.2"})

    tokenizer.save_pretrained(directory)
    added = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<pad>", "<image>", "<instruct>", "<query>")}
    _write_json(directory / "added_tokens.json", added)
    _write_json(directory / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                                                         "unk_token": "<unk>"})
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    tokenizer_config["processor_class"] = "LlavaNextProcessor"
    _write_json(directory / "tokenizer_config.json", tokenizer_config)
    (directory / "chat_template.jinja").write_text(
        "{% for message in messages %}[INST] {{ message['content'] }} [/INST]{% endfor %}\n")
    tile = config.vision_config.image_size
    _write_json(directory / "preprocessor_config.json", {
        "aspect_ratio_setting": "anyres", "crop_size": {"height": tile, "width": tile}, "do_center_crop": True,
        "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
        "image_grid_pinpoints": config.image_grid_pinpoints, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "LlavaNextImageProcessor", "image_std": [0.26862954, 0.26130258, 0.27577711],
        "processor_class": "LlavaNextProcessor", "resample": 3, "rescale_factor": 1 / 255,
        "size": {"shortest_edge": tile}})
    processor = {"image_token": "<image>", "patch_size": config.vision_config.patch_size,
                 "processor_class": "LlavaNextProcessor", "vision_feature_select_strategy": "default"}
    if processor_config == "llava-hf":
        _write_json(directory / "processor_config.json", {**processor, "num_additional_image_tokens": 1})
    elif processor_config == "4.45":
        _write_json(directory / "processor_config.json", processor)
    (directory / "modeling_llavanext_for_embedding.py").write_text(
        "# placeholder of the hub's remote code (not run by bgevl-export)\n")
    return directory
