"""CLIP checkpoints: the offline random-weight generator (hub layout of ``save_pretrained``).

BGE-VL-base/large ship remote code (``modeling_MMRet_CLIP.CLIPModel``, transformers 4.45's CLIPModel plus
``encode``); their weights load into today's ``CLIPModel`` without ``trust_remote_code`` (the checked loader
is ``DualEncoderFamily.load``): the hub repositories' safetensors use CLIPModel's standard tensor names with
no prefix (BAAI/BGE-VL-base and BAAI/BGE-VL-large, ``model.safetensors`` and ``config.json``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bgevl.checkpoints import architecture_for, save_random_model
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
    # transformers annotates merges as list[str]; the BPE model takes (a, b) pairs as well, as here
    return CLIPTokenizer(vocab=vocab, merges=list(_TINY_MERGES), model_max_length=77)  # type: ignore[arg-type]


def generate_clip_checkpoint(spec: ModelSpec, directory: Path) -> Path:
    """Write a random-weight CLIP of ``spec.architecture`` (+ processor files) to ``directory``."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    tokenizer = generated_tokenizer()
    # Any: transformers declares vision_config as dict | CLIPVisionConfig | None and image_size as int | list |
    # tuple | None; CLIPConfig has made it a CLIPVisionConfig, and the architectures declare an int
    config: Any = CLIPConfig(**architecture_for(spec, tokenizer))
    image_size = config.vision_config.image_size
    processor = CLIPProcessor(  # type: ignore[no-untyped-call]  # transformers leaves the processor unannotated
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                              crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
    )
    return save_random_model(CLIPModel, config, processor, directory)
