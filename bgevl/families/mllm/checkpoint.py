"""LLaVA-NeXT checkpoints: the offline random-weight generator and the checked loader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bgevl.checkpoints import architecture_for, check_tokenizer, inspect_checkpoint, load_weights_checked, save_random_model
from bgevl.core.specs import ModelSpec


#: Tokens of the generated Llama-style tokenizer beyond bytes and single characters.
_TINY_LLAMA_MERGES = (
    ("▁", "t"), ("h", "e"), ("▁t", "he"), ("i", "n"), ("▁", "a"), ("e", "r"), ("o", "n"), ("▁", "["),
    ("I", "N"), ("IN", "S"), ("INS", "T"), ("T", "]"), ("▁", "<"), ("r", "e"), ("▁", "o"), ("a", "t"),
)


def generated_llama_tokenizer() -> Any:
    """A Mistral/Llama-style tokenizer (``LlamaTokenizer``: Metaspace, byte fallback, ``<s>`` prepended,
    left padding) with a small deterministic vocabulary, plus ``<pad>`` and the ``<image>``
    placeholder, as llava-v1.6-mistral adds them. Used by the generated tiny MLLM only."""
    import string

    from tokenizers import AddedToken
    from transformers import LlamaTokenizer

    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for ch in ["▁", *sorted(set(string.ascii_letters + string.digits + string.punctuation))]:
        vocab.setdefault(ch, len(vocab))
    for a, b in _TINY_LLAMA_MERGES:
        vocab.setdefault(a + b, len(vocab))
    tokenizer = LlamaTokenizer(vocab=vocab, merges=list(_TINY_LLAMA_MERGES), padding_side="left",
                               add_bos_token=True, add_eos_token=False, model_max_length=32768)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    return tokenizer


def generated_mllm_config(spec: ModelSpec, tokenizer: Any) -> Any:
    """The LlavaNextConfig of ``spec.architecture`` fitted to the generated tokenizer."""
    from transformers import LlavaNextConfig

    return LlavaNextConfig(**architecture_for(spec, tokenizer), image_token_index=tokenizer.convert_tokens_to_ids("<image>"))


def generate_mllm_checkpoint(spec: ModelSpec, directory: Path) -> Path:
    """Write a random-weight LLaVA-NeXT of ``spec.architecture`` (+ processor files) to ``directory``."""
    from transformers import LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil, LlavaNextProcessor

    tokenizer = generated_llama_tokenizer()
    config = generated_mllm_config(spec, tokenizer)
    tile = config.vision_config.image_size
    processor = LlavaNextProcessor(  # type: ignore[no-untyped-call]  # transformers leaves the processor unannotated
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
            image_grid_pinpoints=config.image_grid_pinpoints),
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # the CLS token, as in llava-hf's processor configs
    )
    return save_random_model(LlavaNextForConditionalGeneration, config, processor, directory)


def load_mllm(path: Path, attn_implementation: str = "eager", spec: ModelSpec | None = None) -> tuple[Any, Any]:
    """Load a BGE-VL-MLLM checkpoint (float32) with transformers' LlavaNextForConditionalGeneration.

    The hub checkpoints name the remote-code class ``LLaVANextForEmbedding`` (MegaPairs
    ``modeling_llavanext_for_embedding.py``): a ``LlavaNextForConditionalGeneration`` whose language-model
    forward returns the last hidden states instead of logits. The weights are the same modules in
    transformers 4.45's names, which today's class maps, so they load without ``trust_remote_code``;
    the LM head is loaded but never exported. The processor's settings that 4.45-era
    ``processor_config.json`` files lack are filled from the model config
    (:func:`bgevl.families.mllm.preprocessing.complete_processor`).
    """
    from transformers import LlavaNextForConditionalGeneration

    from bgevl.core.registry import get_model_spec
    from bgevl.families.mllm.preprocessing import complete_processor
    from bgevl.core.preprocessing import load_processor

    files = inspect_checkpoint(Path(path), spec or get_model_spec("tiny-mllm"))
    model = load_weights_checked(LlavaNextForConditionalGeneration, Path(path), files.config, attn_implementation)
    processor = load_processor(path)
    check_tokenizer(processor.tokenizer, Path(path))
    complete_processor(processor, model.config, Path(path))
    return model, processor
