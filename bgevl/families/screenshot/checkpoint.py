"""BGE-VL-Screenshot checkpoints (Qwen2.5-VL): the offline random-weight generator and the checked loader.

The generated checkpoint has the hub's file layout: ``config.json`` of a ``Qwen2_5_VLForConditionalGeneration``,
the weights under the names the released Qwen2.5-VL checkpoints use (``model.*`` for the language model,
``visual.*`` for the vision tower: the layout before transformers 4.52, which today's class maps on load), a
byte-level BPE tokenizer with Qwen's special tokens, the Qwen2.5-VL chat template and the processor's
``preprocessor_config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bgevl.core.specs import ModelSpec

#: Qwen's special tokens, in the order of the Qwen2-VL ``added_tokens.json`` (``<|endoftext|>`` first; the ids here
#: follow the generated vocabulary, the real ones start at 151643)
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)

#: The chat template of Qwen/Qwen2.5-VL-3B-Instruct (its ``chat_template.json``): without a system message it
#: inserts "You are a helpful assistant."; an image becomes ``<|vision_start|><|image_pad|><|vision_end|>``.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

#: Words the generated tokenizer's BPE is trained on (offline, deterministic): prompts and probe texts
_TRAINING_TEXT = (
    "You are a helpful assistant. Represent the given image with the given query. Represent the given input. "
    "system user assistant a photo of a red square blue circle green triangle screenshot page chart document "
    "table title menu button search results the of and to in is for with on that this"
)


def generated_qwen_tokenizer() -> Any:
    """A Qwen2-style byte-level BPE tokenizer (``Qwen2Tokenizer``) with a small vocabulary trained offline on a
    few prompt words, Qwen's special tokens (the chat template is written beside it: :func:`write_processor_files`). For the
    generated tiny model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.train_from_iterator([_TRAINING_TEXT] * 4, trainer)
    state = json.loads(bpe.to_str())["model"]
    merges: Any = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=state["vocab"], merges=merges, padding_side="left",
                               model_max_length=32768, errors="replace")
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    return tokenizer


def write_processor_files(tokenizer: Any, vision_config: Any, bounds: dict[str, int], directory: Path) -> None:
    """The processor files of a Qwen2.5-VL hub repository: ``preprocessor_config.json`` in the form
    Qwen/Qwen2.5-VL-3B-Instruct publishes it (``min_pixels`` / ``max_pixels``, CLIP mean and std,
    ``Qwen2VLImageProcessor``), the tokenizer files and ``chat_template.json``."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": bounds["min_pixels"], "max_pixels": bounds["max_pixels"],
        "patch_size": int(vision_config.patch_size), "temporal_patch_size": int(vision_config.temporal_patch_size),
        "merge_size": int(vision_config.spatial_merge_size), "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD), "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor"}, indent=2) + "\n")
    tokenizer.save_pretrained(directory)
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_VL_CHAT_TEMPLATE}, indent=2) + "\n")


def generated_config(spec: ModelSpec, tokenizer: Any) -> Any:
    """The ``Qwen2_5_VLConfig`` of ``spec.architecture`` fitted to the generated tokenizer's ids."""
    import copy

    from transformers import Qwen2_5_VLConfig

    arch = copy.deepcopy(dict(spec.architecture))
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"))}
    text = arch["text_config"]
    text.update(vocab_size=max(text.get("vocab_size") or 0, len(tokenizer)),
                bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id)
    return Qwen2_5_VLConfig(**arch, **ids)


#: transformers >= 4.52 names -> the names of the released Qwen2.5-VL checkpoints (the inverse of the
#: ``^visual -> model.visual`` and ``^model -> model.language_model`` mapping its class applies on load)
_RELEASED_NAMES = (("model.visual.", "visual."), ("model.language_model.", "model."))


def released_layout(state: dict[str, Any]) -> dict[str, Any]:
    """A state dict under the names the hub checkpoints use (``visual.*``, ``model.*``), tied LM head left out."""
    out = {}
    for name, tensor in state.items():
        if name == "lm_head.weight":
            continue
        for new, old in _RELEASED_NAMES:
            if name.startswith(new):
                name = old + name[len(new):]
                break
        out[name] = tensor
    return out


def generate_screenshot_checkpoint(spec: ModelSpec, directory: Path, pixel_bounds: dict[str, int]) -> Path:
    """Write a random-weight Qwen2.5-VL embedder of ``spec.architecture`` with its processor files."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    from bgevl.checkpoints import GENERATED_SEED

    tokenizer = generated_qwen_tokenizer()
    config = generated_config(spec, tokenizer)
    with torch.random.fork_rng():
        torch.manual_seed(GENERATED_SEED)
        model = Qwen2_5_VLForConditionalGeneration(config).eval()  # type: ignore[no-untyped-call]
    directory.mkdir(parents=True, exist_ok=True)
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    config.save_pretrained(directory)
    state = {k: v.contiguous() for k, v in released_layout(model.state_dict()).items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    write_processor_files(tokenizer, config.vision_config, pixel_bounds, directory)
    return directory


def load_screenshot(path: Path, attn_implementation: str = "eager", spec: ModelSpec | None = None) -> tuple[Any, Any]:
    """A BGE-VL-Screenshot checkpoint (float32) with transformers' ``Qwen2_5_VLForConditionalGeneration``.

    The hub class ``BGE_VL_Screenshot`` (remote code ``modeling_bge_vl_screenshot.py``) subclasses it and runs only
    on transformers 4.49-4.51 (its forward calls ``self.model.embed_tokens``, which 4.52 moved); its weights are
    the parent's modules, so they load into today's class without ``trust_remote_code`` (the tied LM head is
    never exported)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from bgevl.checkpoints import check_tokenizer, inspect_checkpoint, load_weights_checked
    from bgevl.core.registry import get_model_spec
    from bgevl.families.screenshot.processor import ImageTextQwenProcessor

    files = inspect_checkpoint(Path(path), spec or get_model_spec("tiny-screenshot"))
    model = load_weights_checked(Qwen2_5_VLForConditionalGeneration, Path(path), files.config, attn_implementation)
    processor = ImageTextQwenProcessor.from_directory(path)
    check_tokenizer(processor.tokenizer, Path(path))
    return model, processor


def check_processor(processor: Any, config: Any, path: Path) -> None:
    """Refuse, in one line, processor files that contradict the model: no chat template, a template that does not
    render an image as Qwen2.5-VL's vision tokens, token ids of the tokenizer other than ``config.json``'s, or an
    image processor whose patches and merge differ from the vision tower's."""
    from bgevl.core.errors import CheckpointError

    if not processor.chat_template:
        raise CheckpointError(f"{path}: no chat template (chat_template.json); copy it from the hub repository")
    rendered = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], tokenize=False)
    if "<|vision_start|><|image_pad|><|vision_end|>" not in rendered:
        raise CheckpointError(f"{path}: the chat template does not render an image as "
                              f"<|vision_start|><|image_pad|><|vision_end|> (Qwen2.5-VL's); copy chat_template.json from "
                              f"the hub repository")
    tokenizer, vc = processor.tokenizer, config.vision_config
    ids = {"image_token_id": "<|image_pad|>", "vision_start_token_id": "<|vision_start|>",
           "vision_end_token_id": "<|vision_end|>"}
    wrong = [f"{token} is {tokenizer.convert_tokens_to_ids(token)} in the tokenizer, {getattr(config, key)} in config.json"
             for key, token in ids.items() if tokenizer.convert_tokens_to_ids(token) != getattr(config, key)]
    ip = processor.image_processor
    wrong += [f"{name} {getattr(ip, name)} in preprocessor_config.json, {want} in config.json"
              for name, want in (("patch_size", vc.patch_size), ("merge_size", vc.spatial_merge_size),
                                 ("temporal_patch_size", vc.temporal_patch_size)) if getattr(ip, name) != want]
    if wrong:
        raise CheckpointError(f"{path}: the processor files contradict the model ({'; '.join(wrong)}); they belong to "
                              f"another checkpoint: copy them from this model's hub repository")
