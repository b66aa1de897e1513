"""Visualized-BGE checkpoints as BAAI publishes them, a checked loader and the offline generator.

What users have (the hub repository BAAI/bge-visualized and FlagOpen/FlagEmbedding ``research/visual_bge``):

* the weights: ``Visualized_base_en_v1.5.pth`` / ``Visualized_m3.pth`` from the hub repository
  ``BAAI/bge-visualized``: plain fp16 state dicts of FE's ``Visualized_BGE`` (module order
  ``bge_encoder``, ``bge_embeddings``, ``bge_pooler``, ``model_visual``, ``visual_proj``; FE loads them
  with ``load_state_dict(torch.load(path))``, strict), which ``torch.load(weights_only=True)`` reads;
* the text model's ``config.json`` and tokenizer files: ``BAAI/bge-base-en-v1.5`` / ``BAAI/bge-m3``
  (FE builds the text model from that repository by name).

``--model-path`` is either the ``.pth`` file, with the text model's files beside it or in the local
Hugging Face cache, or a directory holding the ``.pth`` and the text model's files (what the
generator writes). The key list below is written out from FE's classes, not derived from
``modeling.py``, so the tests can compare the two.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from bgevl.checkpoints import listed, read_json
from bgevl.core.errors import CheckpointError
from bgevl.core.specs import ModelSpec

if TYPE_CHECKING:  # pragma: no cover  (types only)
    import torch

    from bgevl.families.visualized.modeling import EvaVisionConfig

#: Persistent buffers of transformers < 4.31's embeddings that FE's save may hold; accepted and dropped.
LEGACY_OPTIONAL_KEYS = ("bge_embeddings.position_ids", "bge_embeddings.token_type_ids")
#: The text model types Visualized-BGE is published with (bge-base-en-v1.5: BERT; bge-m3: XLM-RoBERTa).
TEXT_MODEL_TYPES = ("bert", "xlm-roberta")
#: Files of the text model a checkpoint needs beside its weights (one of the tokenizer sets).
TEXT_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.txt",), ("sentencepiece.bpe.model",))


@dataclass(frozen=True)
class VisualizedFiles:
    """Where a checkpoint's parts are: the ``.pth`` weights and the text model's directory."""

    weights: Path
    text_dir: Path


# --- the published layout -------------------------------------------------------------------

def _text_keys(cfg: Any) -> "OrderedDict[str, tuple[int, ...]]":
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    out: OrderedDict[str, tuple[int, ...]] = OrderedDict()
    for i in range(layers):  # transformers' Bert/XLMRobertaLayer parameter names
        p = f"bge_encoder.layer.{i}."
        for m in ("query", "key", "value"):
            out[p + f"attention.self.{m}.weight"] = (h, h)
            out[p + f"attention.self.{m}.bias"] = (h,)
        out[p + "attention.output.dense.weight"] = (h, h)
        out[p + "attention.output.dense.bias"] = (h,)
        out[p + "attention.output.LayerNorm.weight"] = (h,)
        out[p + "attention.output.LayerNorm.bias"] = (h,)
        out[p + "intermediate.dense.weight"] = (inter, h)
        out[p + "intermediate.dense.bias"] = (inter,)
        out[p + "output.dense.weight"] = (h, inter)
        out[p + "output.dense.bias"] = (h,)
        out[p + "output.LayerNorm.weight"] = (h,)
        out[p + "output.LayerNorm.bias"] = (h,)
    out["bge_embeddings.word_embeddings.weight"] = (cfg.vocab_size, h)
    out["bge_embeddings.position_embeddings.weight"] = (cfg.max_position_embeddings, h)
    out["bge_embeddings.token_type_embeddings.weight"] = (cfg.type_vocab_size, h)
    out["bge_embeddings.LayerNorm.weight"] = (h,)
    out["bge_embeddings.LayerNorm.bias"] = (h,)
    out["bge_pooler.dense.weight"] = (h, h)
    out["bge_pooler.dense.bias"] = (h,)
    return out


def _vision_keys(v: EvaVisionConfig) -> "OrderedDict[str, tuple[int, ...]]":
    c, patch, head, mlp = v.width, v.patch_size, v.head_width, v.mlp_hidden
    attn = v.num_heads * v.head_width
    out: OrderedDict[str, tuple[int, ...]] = OrderedDict()
    out["model_visual.logit_scale"] = ()
    p = "model_visual.visual."
    out[p + "cls_token"] = (1, 1, c)
    out[p + "pos_embed"] = (1, v.num_patches + 1, c)
    out[p + "patch_embed.proj.weight"] = (c, 3, patch, patch)
    out[p + "patch_embed.proj.bias"] = (c,)
    out[p + "rope.freqs_cos"] = (v.num_patches, head)
    out[p + "rope.freqs_sin"] = (v.num_patches, head)
    for i in range(v.layers):
        b = f"{p}blocks.{i}."
        out[b + "norm1.weight"] = (c,)
        out[b + "norm1.bias"] = (c,)
        out[b + "attn.q_bias"] = (attn,)
        out[b + "attn.v_bias"] = (attn,)
        out[b + "attn.q_proj.weight"] = (attn, c)
        out[b + "attn.k_proj.weight"] = (attn, c)
        out[b + "attn.v_proj.weight"] = (attn, c)
        out[b + "attn.inner_attn_ln.weight"] = (attn,)
        out[b + "attn.inner_attn_ln.bias"] = (attn,)
        out[b + "attn.proj.weight"] = (c, attn)
        out[b + "attn.proj.bias"] = (c,)
        out[b + "attn.rope.freqs_cos"] = (v.num_patches, head)
        out[b + "attn.rope.freqs_sin"] = (v.num_patches, head)
        out[b + "norm2.weight"] = (c,)
        out[b + "norm2.bias"] = (c,)
        for w in ("w1", "w2"):
            out[b + f"mlp.{w}.weight"] = (mlp, c)
            out[b + f"mlp.{w}.bias"] = (mlp,)
        out[b + "mlp.ffn_ln.weight"] = (mlp,)
        out[b + "mlp.ffn_ln.bias"] = (mlp,)
        out[b + "mlp.w3.weight"] = (c, mlp)
        out[b + "mlp.w3.bias"] = (c,)
    out[p + "norm.weight"] = (c,)
    out[p + "norm.bias"] = (c,)
    out[p + "head.weight"] = (v.clip_embed_dim, c)
    out[p + "head.bias"] = (v.clip_embed_dim,)
    return out


def expected_keys(vision: EvaVisionConfig, text_config: Any) -> "OrderedDict[str, tuple[int, ...]]":
    """key -> shape in the order FE's ``Visualized_BGE.state_dict()`` emits them (488 keys for base)."""
    out = _text_keys(text_config)
    out.update(_vision_keys(vision))
    out["visual_proj.weight"] = (text_config.hidden_size, vision.width)
    out["visual_proj.bias"] = (text_config.hidden_size,)
    return out


def rope_keys(keys: Iterable[str]) -> list[str]:
    return [k for k in keys if k.endswith((".rope.freqs_cos", ".rope.freqs_sin"))]


# --- locating and reading ---------------------------------------------------------------------

def _has_text_files(directory: Path) -> bool:
    return (directory / "config.json").is_file() and any(
        all((directory / f).is_file() for f in group) for group in TEXT_TOKENIZER_FILES)


def locate(path: Path) -> VisualizedFiles:
    """The ``.pth`` and the text model's directory of a ``--model-path`` (see the module docstring)."""
    from bgevl.families.visualized.models import MODELS

    path = Path(path).expanduser()
    if path.is_dir():
        weights = sorted(path.glob("*.pth"))
        if len(weights) != 1:
            raise CheckpointError(
                f"--model-path {path}: {'no' if not weights else len(weights)} .pth files there "
                f"({listed([w.name for w in weights])}); a Visualized-BGE directory holds one Visualized_*.pth and the "
                f"text model's config.json and tokenizer files, or pass the .pth file itself")
        if not _has_text_files(path):
            raise CheckpointError(
                f"--model-path {path}: no text-model config.json and tokenizer files beside {weights[0].name}; copy them "
                f"from the text model's hub repository (BAAI/bge-base-en-v1.5 or BAAI/bge-m3) into the directory")
        return VisualizedFiles(weights[0], path)
    if not path.is_file():
        raise CheckpointError(f"--model-path {path}: no such file or directory; pass the Visualized_*.pth file or the "
                              f"directory holding it with the text model's config.json and tokenizer")
    if path.suffix != ".pth":
        raise CheckpointError(f"--model-path {path}: not a .pth file; Visualized-BGE's weights are Visualized_*.pth "
                              f"(hub repository BAAI/bge-visualized)")
    if _has_text_files(path.parent):
        return VisualizedFiles(path, path.parent)
    published = [m for m in MODELS if m.architecture.get("weights_file") == path.name]
    if published:
        from bgevl.checkpoints import download_repository

        spec = published[0]
        text_repo = spec.architecture["text_hub_id"]
        try:
            return VisualizedFiles(path, download_repository(spec, TEXT_PATTERNS, text_repo, local_only=True))
        except CheckpointError:
            pass
        raise CheckpointError(
            f"{path}: the text model's config.json and tokenizer are neither beside it nor in the local Hugging Face "
            f"cache ({text_repo}); download them (`huggingface-cli download {text_repo} --local-dir DIR`) and copy "
            f"{path.name} into DIR, then pass --model-path DIR")
    raise CheckpointError(
        f"{path}: no text-model config.json and tokenizer files beside it; put {path.name} in a directory with the "
        f"config.json and tokenizer files of its text model (BAAI/bge-base-en-v1.5 or BAAI/bge-m3)")


#: The text model's files fetched from its hub repository.
TEXT_PATTERNS = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                  "sentencepiece.bpe.model")


def read_state_dict(weights: Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)``: the published files hold only an OrderedDict of fp16 tensors;
    anything else (a pickle needing arbitrary code, a truncated download) is refused."""
    import pickle
    import zipfile

    import torch

    try:
        state = torch.load(str(weights), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{weights}: not a loadable weights-only state dict ({first[:200]}); the download is "
                              f"truncated or it is not a Visualized-BGE .pth: download it again") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{weights}: not a state dict of tensors (got {type(state).__name__}); pass FE's "
                              f"Visualized_*.pth")
    return state


def check_state_dict(state: Mapping[str, torch.Tensor], expected: "OrderedDict[str, tuple[int, ...]]",
                     weights: Path) -> None:
    """One line on missing, unexpected or mis-shaped tensors, or rope tables that differ between copies."""
    import torch

    keys = set(state) - set(LEGACY_OPTIONAL_KEYS)
    missing = [k for k in expected if k not in keys]
    unexpected = sorted(keys - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights}: the tensors do not fit the architecture of the text model's config.json and the tower's "
            f"shapes: {len(missing)} missing ({listed(missing)}), {len(unexpected)} unexpected ({listed(unexpected)}); "
            f"the file is of another model or its text model files do not belong to it")
    bad = [f"{k} {tuple(state[k].shape)} (expected {expected[k]})" for k in expected if tuple(state[k].shape) != expected[k]]
    if bad:
        raise CheckpointError(f"{weights}: {len(bad)} tensors of the wrong shape ({listed(bad)}); the text model's "
                              f"config.json does not belong to these weights")
    # FE shares one rope module between visual.rope and every block; loading writes it 1+L times and
    # the last copy wins. The published files store one tensor; copies that differ are a broken file.
    for name in ("freqs_cos", "freqs_sin"):
        copies = [k for k in rope_keys(state) if k.endswith(name)]
        if any(not torch.equal(state[copies[0]], state[k]) for k in copies[1:]):
            raise CheckpointError(f"{weights}: the rotary tables {name} differ between the tower's copies; the file is "
                                  f"corrupt: download it again")


def read_text_config(text_dir: Path) -> Any:
    from transformers import AutoConfig

    raw = read_json(text_dir / "config.json", "text model's config")
    if raw.get("model_type") not in TEXT_MODEL_TYPES:
        raise CheckpointError(
            f"{text_dir / 'config.json'}: a {raw.get('model_type')!r} config; Visualized-BGE's text model is BERT "
            f"(bge-base-en-v1.5) or XLM-RoBERTa (bge-m3): copy the config.json of the matching text model")
    return AutoConfig.from_pretrained(str(text_dir))


@dataclass(frozen=True)
class LoadedCheckpoint:
    files: VisualizedFiles
    state: dict[str, torch.Tensor]
    text_config: Any  # the text model's transformers config
    vision: EvaVisionConfig


def inspect_visualized(path: Path, spec: ModelSpec | None = None) -> LoadedCheckpoint:
    """Locate, read and check a checkpoint (everything but building the model); for a hub model's
    ``spec`` its sizes must be that model's."""
    from bgevl.families.visualized.modeling import EvaVisionConfig

    files = locate(path)
    text_config = read_text_config(files.text_dir)
    state = read_state_dict(files.weights)
    try:
        vision = EvaVisionConfig.from_state_dict(state)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{files.weights}: no EVA-CLIP vision tower in it (no {exc}); pass a Visualized_*.pth") from None
    check_state_dict(state, expected_keys(vision, text_config), files.weights)
    if spec is not None and not spec.generated:
        want = spec.architecture
        differ = [f"vision {k} {getattr(vision, k)} (spec {want['vision'][k]})" for k in ("width", "layers", "patch_size")
                  if getattr(vision, k) != want["vision"][k]]
        differ += [f"text {k} {getattr(text_config, k)} (spec {want['text'][k]})"
                   for k in ("hidden_size", "num_hidden_layers") if getattr(text_config, k) != want["text"][k]]
        if differ:
            raise CheckpointError(f"{files.weights} is not {spec.description.split(':')[0]}: {', '.join(differ)}; pass "
                                  f"the --model that matches it")
    return LoadedCheckpoint(files, state, text_config, vision)


def load_tokenizer(text_dir: Path) -> Any:
    from transformers import AutoTokenizer

    from bgevl.checkpoints import check_tokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(text_dir))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{text_dir}: cannot load the text model's tokenizer ({exc}); copy its tokenizer files "
                              f"from the hub repository") from None
    check_tokenizer(tokenizer, text_dir)
    return tokenizer


def load_visualized(path: Path, spec: ModelSpec | None = None, attn_implementation: str = "eager") -> tuple[Any, Any]:
    """The checked float32 model (``modeling.VisualizedBGE``) and the text model's tokenizer."""
    import torch

    from bgevl.families.visualized.modeling import VisualizedBGE

    ckpt = inspect_visualized(path, spec)
    tokenizer = load_tokenizer(ckpt.files.text_dir)
    model = VisualizedBGE(ckpt.vision, ckpt.text_config, attn_implementation)
    state = {k: v for k, v in ckpt.state.items() if k not in LEGACY_OPTIONAL_KEYS}
    model.load_state_dict(state, strict=True)  # fp16 -> the model's float32 (the rope tables as stored)
    return model.to(torch.float32).eval(), tokenizer


# --- the offline generator ---------------------------------------------------------------------

_WORDS = ("the a an of and to in is on with for at by from this that it as are was be or not no yes "
          "red green blue black white yellow small large big little old new two three one dog cat car "
          "bird man woman child person people house tree street water sky photo image picture shirt "
          "wearing holding sitting standing running near under over left right same different color "
          "replace make change show find retrieve similar target query beach dark background ##s ##ed ##ing ##er ##ly").split()


def _write_bert_tokenizer(out: Path) -> int:
    """A deterministic WordPiece vocabulary (lower case) in bge-base-en-v1.5's file layout."""
    from transformers import BertTokenizer

    vocab: list[str] = []
    for token in (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'\"-:;()")
                  + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"] + list(_WORDS)):
        if token not in vocab:
            vocab.append(token)
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizer(vocab=str(out / "vocab.txt"), do_lower_case=True, model_max_length=512).save_pretrained(str(out))
    return len(vocab)


def _write_xlmr_tokenizer(out: Path) -> int:
    """A deterministic Unigram ``tokenizer.json`` in bge-m3's shape (Metaspace, ``<s> $A </s>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = ["▁" + w for w in _WORDS if not w.startswith("##")] + ["▁"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'\"-:;()")
    pieces += ["s", "ed", "ing", "er", "ly"]
    seen, scored = set(), []
    for i, piece in enumerate(pieces):
        if piece not in seen:
            seen.add(piece)
            scored.append((piece, -1.0 - 0.01 * i - (0.0 if piece.startswith("▁") and len(piece) > 1 else 5.0)))
    vocab = [(s, 0.0) for s in ("<s>", "<pad>", "</s>", "<unk>")] + scored + [("<mask>", 0.0)]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                       pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tokenizer.save(str(out / "tokenizer.json"))
    PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]  # transformers leaves its __init__ unannotated
        tokenizer_file=str(out / "tokenizer.json"), bos_token="<s>", eos_token="</s>", sep_token="</s>",
        cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
        model_max_length=8192).save_pretrained(str(out))
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "XLMRobertaTokenizer"
    config_file.write_text(json.dumps(config, indent=2))
    return len(vocab)


_NORM_MODULES = {"LayerNorm", "norm1", "norm2", "norm", "inner_attn_ln", "ffn_ln"}


def random_state_dict(vision: EvaVisionConfig, text_config: Any, seed: int) -> "OrderedDict[str, torch.Tensor]":
    """Random fp16 tensors for every expected key, in the published order; the rope tables are the real
    ones fp16-rounded, one tensor shared by every copy (as ``torch.save`` stores FE's shared module).
    Padding rows of the embeddings are random too, so a wrong position offset shows."""
    import torch

    from bgevl.families.visualized.modeling import compute_rope_tables

    generator = torch.Generator().manual_seed(seed)
    cos, sin = (t.half() for t in compute_rope_tables(vision))
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, shape in expected_keys(vision, text_config).items():
        if key.endswith("freqs_cos"):
            tensor = cos
        elif key.endswith("freqs_sin"):
            tensor = sin
        elif key == "model_visual.logit_scale":
            tensor = torch.tensor(math.log(1 / 0.07))
        elif key.split(".")[-2] in _NORM_MODULES and key.endswith("weight"):
            tensor = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif key.endswith("bias"):
            tensor = 0.05 * torch.randn(shape, generator=generator)
        elif "embeddings" in key or key.endswith(("cls_token", "pos_embed")):
            tensor = 0.5 * torch.randn(shape, generator=generator)
        else:  # Linear / Conv weights
            tensor = torch.randn(shape, generator=generator) / math.sqrt(math.prod(shape[1:]))
        state[key] = tensor.to(torch.float16)
    return state


def generate_visualized_checkpoint(spec: ModelSpec, directory: Path) -> Path:
    """A random-weight checkpoint of ``spec.architecture`` in the published form: ``<directory>/Visualized_<key>.pth``
    (fp16, FE's key order, shared rope tables) beside the text model's config.json and tokenizer files."""
    import torch
    from transformers import BertConfig, XLMRobertaConfig

    from bgevl.checkpoints import GENERATED_SEED
    from bgevl.families.visualized.modeling import EvaVisionConfig

    arch = spec.architecture
    directory.mkdir(parents=True, exist_ok=True)
    bert = arch["text_model_type"] == "bert"
    words = _write_bert_tokenizer(directory) if bert else _write_xlmr_tokenizer(directory)
    text = dict(arch["text"])
    text["vocab_size"] = max(text.get("vocab_size") or 0, words)
    config = (BertConfig if bert else XLMRobertaConfig)(**text)
    config.architectures = ["BertModel" if bert else "XLMRobertaModel"]
    config.save_pretrained(str(directory))
    vision = EvaVisionConfig(**arch["vision"])
    torch.save(random_state_dict(vision, config, GENERATED_SEED), str(directory / arch.get("weights_file", f"Visualized_{spec.key}.pth")))
    return directory


def save_published(model: Any, path: Path) -> None:
    """A ``modeling.VisualizedBGE`` in the published form (FE's key order, fp16, one tensor per rope table)."""
    import torch

    state = model.state_dict()
    shared: dict[str, torch.Tensor] = {}
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key in expected_keys(model.vision_config, model.text_config):
        tensor = state[key].detach().to("cpu", torch.float16).contiguous()
        if rope_keys([key]):
            tensor = shared.setdefault(key.rsplit(".", 1)[1], tensor)
        out[key] = tensor
    torch.save(out, str(path))
