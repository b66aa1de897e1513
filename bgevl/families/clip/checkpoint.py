"""CLIP checkpoints: the offline random-weight generator (hub layout of ``save_pretrained``) and the checked loader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bgevl.checkpoints import architecture_for, check_tokenizer, inspect_checkpoint, load_weights_checked, save_random_model
from bgevl.core.specs import ModelSpec


#: Merges of the generated tokenizer's BPE, written out so that the vocabulary is identical on
#: every machine (tokenizers' BpeTrainer breaks ties differently from run to run).
_TINY_MERGES = (
    ("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("i", "n"), ("in", "g</w>"),
    ("o", "f</w>"), ("o", "n</w>"), ("e", "r"), ("e", "d</w>"), ("a", "t"), ("o", "r"),
    ("a", "r"), ("e", "n"), ("s", "t"), ("p", "h"), ("ph", "o"), ("c", "a"), ("o", "u"),
    ("i", "s</w>"), ("t", "o</w>"), ("w", "h"),
)


def generated_tokenizer() -> Any:
    """A CLIP BPE tokenizer with a small deterministic vocabulary.

    Same class, normalizer, pre-tokenizer and special tokens as BGE-VL's CLIPTokenizer; the
    vocabulary is the 512 byte-level symbols (with and without ``</w>``), a fixed list of
    merges and the two special tokens. Used by the generated random-weight models only.
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for symbol in alphabet + [s + "</w>" for s in alphabet]:
        vocab[symbol] = len(vocab)
    for a, b in _TINY_MERGES:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=list(_TINY_MERGES), model_max_length=77)


def generate_clip_checkpoint(spec: ModelSpec, directory: Path) -> Path:
    """Write a random-weight CLIP of ``spec.architecture`` (+ processor files) to ``directory``."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    tokenizer = generated_tokenizer()
    config = CLIPConfig(**architecture_for(spec, tokenizer))
    image_size = config.vision_config.image_size
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                              crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
    )
    return save_random_model(CLIPModel, config, processor, directory)


def load_clip(path: Path, attn_implementation: str = "eager", spec: ModelSpec | None = None) -> tuple[Any, Any]:
    """Load a BGE-VL CLIP checkpoint (float32) with transformers' CLIPModel and its processor.

    ``attn_implementation``: eager (the export's traced modules) or sdpa (transformers' default,
    what the benchmarks compare against). The checkpoint is checked first
    (:func:`inspect_checkpoint`); ``spec`` defaults to the generated ``tiny`` (any CLIP size).

    BGE-VL-base/large ship remote code (``modeling_MMRet_CLIP.CLIPModel``, transformers 4.45's
    CLIPModel plus ``encode``); the weights load into today's ``CLIPModel`` without
    ``trust_remote_code`` (standard names, no prefix; ``../shared/reference/hub-checkpoints.md``).
    """
    from transformers import CLIPModel

    from bgevl.core.registry import get_model_spec
    from bgevl.core.preprocessing import load_processor

    files = inspect_checkpoint(Path(path), spec or get_model_spec("tiny"))
    model = load_weights_checked(CLIPModel, Path(path), files.config, attn_implementation)
    processor = load_processor(path)
    check_tokenizer(processor.tokenizer, Path(path))
    return model, processor
