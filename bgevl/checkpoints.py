"""Where a model's weights come from: the hub, a local directory, or an offline generator.

* ``--model-path DIR``: a local checkpoint (``config.json`` + weights + processor files).
* ``--model base|large``: the BAAI hub repository, from the local Hugging Face cache when it is
  there, else downloaded. With no network this fails at once with a message naming
  ``--model-path``.
* ``--model tiny`` (and ``--random-weights`` for the full-size architectures): a random-weight
  CLIP of the declared architecture, generated deterministically and offline, written with
  ``save_pretrained`` and loaded back through the same path as a real checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bgevl.errors import CheckpointError
from bgevl.specs import ModelSpec

#: Seed of every generated random-weight model.
GENERATED_SEED = 0

#: Merges of the generated tokenizer's BPE, written out so that the vocabulary is identical on
#: every machine (tokenizers' BpeTrainer breaks ties differently from run to run).
_TINY_MERGES = (
    ("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("i", "n"), ("in", "g</w>"),
    ("o", "f</w>"), ("o", "n</w>"), ("e", "r"), ("e", "d</w>"), ("a", "t"), ("o", "r"),
    ("a", "r"), ("e", "n"), ("s", "t"), ("p", "h"), ("ph", "o"), ("c", "a"), ("o", "u"),
    ("i", "s</w>"), ("t", "o</w>"), ("w", "h"),
)


@dataclass(frozen=True)
class ResolvedCheckpoint:
    path: Path
    source: str  # human-readable origin recorded in the manifest
    weights: str  # "pretrained" or "random"


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


def _architecture_for(spec: ModelSpec, tokenizer: Any) -> dict[str, Any]:
    """``spec.architecture`` with the text config's vocabulary and special ids taken from the tokenizer."""
    import copy

    arch = copy.deepcopy(dict(spec.architecture))
    text = arch["text_config"]
    text["vocab_size"] = max(text.get("vocab_size") or 0, len(tokenizer))
    text.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    return arch


def _save_random_model(model_class: Any, config: Any, processor: Any, directory: Path) -> Path:
    """Build ``model_class(config)`` with the generator seed and save it with its processor files."""
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(GENERATED_SEED)
        model = model_class(config).eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def generate_clip_checkpoint(spec: ModelSpec, directory: Path) -> Path:
    """Write a random-weight CLIP of ``spec.architecture`` (+ processor files) to ``directory``."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    tokenizer = generated_tokenizer()
    config = CLIPConfig(**_architecture_for(spec, tokenizer))
    image_size = config.vision_config.image_size
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                              crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
    )
    return _save_random_model(CLIPModel, config, processor, directory)


def _hub_offline_message(spec: ModelSpec, reason: str) -> str:
    return (
        f"cannot get {spec.hub_id} from the Hugging Face Hub ({reason}). "
        f"Download the checkpoint on a machine with network access "
        f"(`huggingface-cli download {spec.hub_id} --local-dir DIR`), copy it here and run "
        f"`bgevl-export --model {spec.key} --model-path DIR`, or use `--model tiny` for the offline "
        f"random-weight model."
    )


def resolve_checkpoint(spec: ModelSpec, *, model_path: str | os.PathLike | None, random_weights: bool,
                       workdir: Path) -> ResolvedCheckpoint:
    if model_path is not None:
        path = Path(model_path).expanduser()
        if not path.is_dir():
            raise CheckpointError(
                f"--model-path {path}: no such directory. Pass the directory that holds the "
                f"checkpoint's config.json, weights and processor files."
            )
        if not (path / "config.json").is_file():
            raise CheckpointError(
                f"--model-path {path}: no config.json there. Point --model-path at the checkpoint "
                f"directory itself (the one with config.json and model.safetensors)."
            )
        return ResolvedCheckpoint(path.resolve(), f"local:{path.resolve()}", "pretrained")
    if spec.generated or random_weights:
        generate = generate_clip_checkpoint if spec.family == "clip" else generate_mllm_checkpoint
        path = generate(spec, workdir / f"generated-{spec.key}")
        return ResolvedCheckpoint(path, f"generated:{spec.key} (random weights, seed {GENERATED_SEED})", "random")
    return ResolvedCheckpoint(_download(spec), f"hub:{spec.hub_id}", "pretrained")


def _download(spec: ModelSpec) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model"]
    try:  # the local cache first: no network needed when the model was downloaded before
        return Path(snapshot_download(spec.hub_id, allow_patterns=patterns, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise CheckpointError(_hub_offline_message(spec, "HF_HUB_OFFLINE is set and it is not in the local cache"))
    try:
        return Path(snapshot_download(spec.hub_id, allow_patterns=patterns))
    except LocalEntryNotFoundError as exc:
        raise CheckpointError(_hub_offline_message(spec, "no network connection to the hub")) from exc
    except HfHubHTTPError as exc:
        raise CheckpointError(_hub_offline_message(spec, f"the hub answered: {exc}")) from exc
    except OSError as exc:
        raise CheckpointError(_hub_offline_message(spec, f"{type(exc).__name__}: {exc}")) from exc


def load_clip(path: Path, attn_implementation: str = "eager") -> tuple[Any, Any]:
    """Load a BGE-VL CLIP checkpoint with transformers' CLIPModel and its processor.

    ``attn_implementation``: eager (the export's reference) or sdpa (transformers' default, what
    the benchmarks compare against).

    BGE-VL-base/large ship remote code (``MMRet_CLIP``) that is transformers' CLIPModel plus
    helper methods; the weights load into today's ``CLIPModel`` without ``trust_remote_code``.
    """
    from transformers import AutoProcessor, CLIPConfig, CLIPModel

    try:
        config = CLIPConfig.from_pretrained(path)
        model = CLIPModel.from_pretrained(path, config=config, attn_implementation=attn_implementation).eval()
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"cannot load a CLIP checkpoint from {path}: {exc}. The directory needs config.json, "
            f"the weights (model.safetensors or pytorch_model.bin) and the tokenizer/preprocessor files."
        ) from exc
    return model, processor


# ---------------------------------------------------------------------------------------
# LLaVA-NeXT embedders (BGE-VL-MLLM)
# ---------------------------------------------------------------------------------------

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
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
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

    return LlavaNextConfig(**_architecture_for(spec, tokenizer), image_token_index=tokenizer.convert_tokens_to_ids("<image>"))


def generate_mllm_checkpoint(spec: ModelSpec, directory: Path) -> Path:
    """Write a random-weight LLaVA-NeXT of ``spec.architecture`` (+ processor files) to ``directory``."""
    from transformers import LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil, LlavaNextProcessor

    tokenizer = generated_llama_tokenizer()
    config = generated_mllm_config(spec, tokenizer)
    tile = config.vision_config.image_size
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
            image_grid_pinpoints=config.image_grid_pinpoints),
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # the CLS token, as in llava-hf's processor configs
    )
    return _save_random_model(LlavaNextForConditionalGeneration, config, processor, directory)


def load_mllm(path: Path, attn_implementation: str = "eager") -> tuple[Any, Any]:
    """Load a BGE-VL-MLLM checkpoint with transformers' LlavaNextForConditionalGeneration.

    The hub checkpoints name the remote-code class ``LLaVANextForEmbedding`` (MegaPairs
    ``modeling_llava_next.py``): a ``LlavaNextForConditionalGeneration`` whose language-model forward
    returns the last hidden states instead of logits. The weights are the same modules, so they
    load into today's class without ``trust_remote_code``; the LM head is loaded but never exported.
    """
    from transformers import AutoProcessor, LlavaNextConfig, LlavaNextForConditionalGeneration

    try:
        config = LlavaNextConfig.from_pretrained(path)
        model = LlavaNextForConditionalGeneration.from_pretrained(
            path, config=config, attn_implementation=attn_implementation, dtype="float32").eval()
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"cannot load a LLaVA-NeXT checkpoint from {path}: {exc}. The directory needs config.json, "
            f"the weights (*.safetensors) and the tokenizer/processor files."
        ) from exc
    return model, processor
