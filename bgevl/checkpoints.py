"""Where a model's weights come from: the hub, a local directory, or an offline generator.

* ``--model-path DIR``: a local checkpoint (``config.json`` + weights + processor files).
* ``--model base|large``: the BAAI hub repository, from the local Hugging Face cache when it is
  there, else downloaded. With no network this fails at once with a message naming
  ``--model-path``.
* ``--model tiny`` (and ``--random-weights`` for the full-size architectures): a random-weight
  model of the declared architecture, generated deterministically and offline by its family
  (``Family.generate_checkpoint``) and loaded back through the same path as a real checkpoint.

The checks below are the same for every family; what a family's checkpoint holds is its
``CheckpointKind`` (``bgevl.core.family``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bgevl.core.errors import BgevlError, CheckpointError
from bgevl.core.registry import family_of
from bgevl.core.family import CheckpointKind, CheckpointSource
from bgevl.core.specs import ModelSpec

#: Seed of every generated random-weight model.
GENERATED_SEED = 0

@dataclass(frozen=True)
class ResolvedCheckpoint:
    path: Path
    source: str  # human-readable origin recorded in the manifest
    weights: str  # "pretrained" or "random"


def architecture_for(spec: ModelSpec, tokenizer: Any) -> dict[str, Any]:
    """``spec.architecture`` with the text config's vocabulary and special ids taken from the tokenizer."""
    import copy

    arch = copy.deepcopy(dict(spec.architecture))
    text = arch["text_config"]
    text["vocab_size"] = max(text.get("vocab_size") or 0, len(tokenizer))
    text.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    return arch


def save_random_model(model_class: Any, config: Any, processor: Any, directory: Path) -> Path:
    """Build ``model_class(config)`` with the generator seed and save it with its processor files."""
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(GENERATED_SEED)
        model = model_class(config).eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


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
    family = family_of(spec)
    if model_path is not None:
        path = family.local_checkpoint(Path(model_path).expanduser())
        return ResolvedCheckpoint(path.resolve(), f"local:{path.resolve()}", "pretrained")
    if spec.generated or random_weights:
        path = family.generate_checkpoint(spec, workdir / f"generated-{spec.key}")
        return ResolvedCheckpoint(path, f"generated:{spec.key} (random weights, seed {GENERATED_SEED})", "random")
    return ResolvedCheckpoint(family.download(spec), f"hub:{spec.hub_id}", "pretrained")


def checkpoint_directory(path: Path) -> Path:
    """A ``--model-path`` in the hub's transformers layout: a directory with ``config.json``."""
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
    return path


def download_repository(spec: ModelSpec, patterns: tuple[str, ...] = ("*.json", "*.safetensors", "*.txt", "*.model"),
                        repo_id: str | None = None, local_only: bool = False) -> Path:
    """``repo_id`` (default ``spec.hub_id``) from the local Hugging Face cache, else downloaded; the
    files matching ``patterns``. No network: one line naming ``--model-path``."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id = repo_id or spec.hub_id
    if repo_id is None:
        raise CheckpointError(f"model {spec.key!r} has no hub repository to download")
    try:  # the local cache first: no network needed when the model was downloaded before
        return Path(snapshot_download(repo_id, allow_patterns=list(patterns), local_files_only=True))
    except LocalEntryNotFoundError:
        if local_only:
            raise CheckpointError(f"{repo_id} is not in the local Hugging Face cache") from None
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise CheckpointError(_hub_offline_message(spec, "HF_HUB_OFFLINE is set and it is not in the local cache"))
    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(patterns)))
    except LocalEntryNotFoundError as exc:
        raise CheckpointError(_hub_offline_message(spec, "no network connection to the hub")) from exc
    except HfHubHTTPError as exc:
        raise CheckpointError(_hub_offline_message(spec, f"the hub answered: {exc}")) from exc
    except OSError as exc:
        raise CheckpointError(_hub_offline_message(spec, f"{type(exc).__name__}: {exc}")) from exc


# ---------------------------------------------------------------------------------------
# Checking a checkpoint before it is used
# ---------------------------------------------------------------------------------------
#
# A checkpoint that loads with warnings exports a wrong model that validates against itself
# (missing tensors are initialized at random, a BERT config becomes a default CLIP, missing
# tokenizer files give a tokenizer that maps every text to the same ids). Everything below
# refuses such a directory with one line naming the problem and the fix, before anything is
# exported.

#: Texts every tokenizer must map to distinct, mostly known token ids.
_TOKENIZER_PROBES = ("a red car", "two dogs on a beach", "Make the background dark")
#: How many names a refusal lists before "... and N more".
_LISTED = 5


@dataclass(frozen=True)
class CheckpointFiles:
    """What :func:`inspect_checkpoint` found: the parsed config and the weight files' tensors."""

    path: Path
    config: Any
    weight_files: tuple[Path, ...]
    tensors: int
    stored_dtypes: tuple[str, ...]  # dtypes of the stored tensors ("F16", "BF16", "F32", ...)


def listed(names: Any) -> str:
    names = sorted(names)
    more = f" and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
    return ", ".join(names[:_LISTED]) + more


def _dotted(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part, None)
    return obj


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read the {what} ({type(exc).__name__}: {exc}); "
                              f"download the file again") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: the {what} is not a JSON object; download the file again")
    return data


def weight_files(path: Path) -> list[Path]:
    """The weight files a loader reads: an index's shards or the single ``model.safetensors``."""
    if not (path / "model.safetensors").is_file() and not (path / "model.safetensors.index.json").is_file() and (
            (path / "pytorch_model.bin").is_file() or (path / "pytorch_model.bin.index.json").is_file()):
        raise CheckpointError(
            f"{path}: pytorch_model.bin (pickle) weights; bgevl-export reads safetensors (what the BGE-VL hub "
            f"repositories publish). Convert once with transformers: "
            f"AutoModel.from_pretrained(DIR).save_pretrained(NEW_DIR, safe_serialization=True), copying the tokenizer "
            f"and processor files")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "weight index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no weight_map; download the file again")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{path}: the weight index names shards that are not there ({listed(missing)}); "
                                  f"the download is incomplete: download the missing files")
        return [path / s for s in shards]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    raise CheckpointError(f"{path}: no weights (model.safetensors, or shards with model.safetensors.index.json); "
                          f"download them into the directory")


def _safetensors_header(file: Path) -> dict[str, str]:
    """{tensor name: stored dtype} from a safetensors header; refuses truncated or corrupt files
    (safetensors checks that the header's offsets cover the file exactly)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="np") as f:
            return {name: f.get_slice(name).get_dtype() for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: unreadable weight file ({exc}); it is truncated or corrupt: "
                              f"download it again") from None


def inspect_checkpoint(path: Path, spec: ModelSpec) -> CheckpointFiles:
    """Check a checkpoint directory against ``spec`` without loading its weights.

    Refused (``CheckpointError``, one line): an unreadable config, a config of another architecture
    (a BERT checkpoint given as ``--model base``), a checkpoint of another size than a hub model's
    spec (``--model base`` given BGE-VL-large), missing/truncated/corrupt weight files, missing
    tokenizer or image-processor files. Generated specs (``tiny``, ``tiny-mllm``) accept any size
    of their family, so small test checkpoints can be exported with ``--model tiny --model-path``.
    """
    import transformers

    kind = family_of(spec).checkpoint_kind
    raw = read_json(path / "config.json", "model config (config.json)")
    if raw.get("model_type") != kind.model_type:
        found = raw.get("model_type") or "no model_type"
        archs = ", ".join(raw.get("architectures") or []) or "architecture not named"
        raise CheckpointError(
            f"{path} holds a {found!r} checkpoint ({archs}), not a {kind.architecture} (model_type "
            f"{kind.model_type!r}) as --model {spec.key} needs; pass the directory of a {spec.hub_id or spec.key} "
            f"checkpoint or the --model that matches this one")
    try:
        config = getattr(transformers, kind.config_class).from_dict(raw)
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path / 'config.json'}: not a valid {kind.config_class} ({exc}); "
                              f"download the file again") from None
    if not spec.generated:
        differ = _identity_differences(config, spec, kind)
        if differ:
            others = [m.key for m in _same_family(spec) if not _identity_differences(config, m, kind)]
            hint = f"it matches --model {others[0]}" if others else "no --model of this family matches it"
            raise CheckpointError(f"{path} is not {spec.hub_id}: {listed(differ)}; {hint}")
    files = weight_files(path)
    stored: dict[str, str] = {}
    for file in files:
        stored.update(_safetensors_header(file))
    if not any(all((path / f).is_file() for f in group) for group in kind.tokenizer_files):
        wanted = " or ".join(" + ".join(g) for g in kind.tokenizer_files)
        raise CheckpointError(f"{path}: no tokenizer files ({wanted}); copy them from the model's hub "
                              f"repository into the directory")
    processor_config = path / "processor_config.json"
    if not (path / "preprocessor_config.json").is_file() and not (
            processor_config.is_file() and "image_processor" in read_json(processor_config, "processor config")):
        raise CheckpointError(f"{path}: no image-processor settings (preprocessor_config.json); copy the file from "
                              f"the hub repository into the directory")
    return CheckpointFiles(path, config, tuple(files), len(stored), tuple(sorted(set(stored.values()))))


def _same_family(spec: ModelSpec) -> list[ModelSpec]:
    return [m for m in family_of(spec).models if not m.generated and m.key != spec.key]


def _identity_differences(config: Any, spec: ModelSpec, kind: CheckpointKind) -> list[str]:
    """The identity attributes where ``config`` is not ``spec``'s architecture, as "name value (spec value)"."""
    import transformers

    want = getattr(transformers, kind.config_class)(**spec.architecture)
    return [f"{k} {_dotted(config, k)} (spec {_dotted(want, k)})" for k in kind.identity
            if _dotted(config, k) != _dotted(want, k)]


def load_weights_checked(model_class: Any, path: Path, config: Any, attn_implementation: str) -> Any:
    """``model_class.from_pretrained`` in **float32** (transformers 5 otherwise keeps the stored 16-bit
    dtype, and the original remote code runs in float32), refusing any missing, unexpected or
    mismatched tensor instead of initializing it at random."""
    import torch
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report becomes the one-line refusal below
    try:
        model, info = model_class.from_pretrained(path, config=config, attn_implementation=attn_implementation,
                                                  dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot load the weights in {path}: {first}; download them again") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    problems = []
    for key, what in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"), ("mismatched_keys", "of the wrong shape")):
        names = [k if isinstance(k, str) else k[0] for k in info.get(key) or ()]
        if names:
            problems.append(f"{len(names)} tensors {what} ({listed(names)})")
    if problems:
        raise CheckpointError(f"{path}: the weights do not fit the {config.architectures[0] if config.architectures else model_class.__name__} "
                              f"of config.json: {'; '.join(problems)}; the checkpoint is incomplete or of another model: "
                              f"download it again from its hub repository")
    return model.eval()


def check_tokenizer(tokenizer: Any, path: Path) -> None:
    """Refuse a tokenizer that maps different texts to the same ids or to unknown tokens (what
    transformers builds when the vocabulary files are missing: every text becomes ``[0 2 2 ...]``)."""
    ids = [tuple(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in _TOKENIZER_PROBES]
    unk = getattr(tokenizer, "unk_token_id", None)
    unknown = sum(1 for seq in ids for i in seq if i == unk) / max(1, sum(len(seq) for seq in ids))
    if len(set(ids)) < len(ids) or not all(ids) or unknown > 0.5:
        raise CheckpointError(
            f"{path}: the tokenizer is degenerate (it maps {_TOKENIZER_PROBES[0]!r} and {_TOKENIZER_PROBES[1]!r} to "
            f"{list(ids[0])[:6]} and {list(ids[1])[:6]}); its vocabulary files are missing or broken: copy the "
            f"tokenizer files of the hub repository into the directory")


def check_checkpoint(spec: ModelSpec, path: Path, report: Any = print) -> None:
    """``bgevl-export check``: everything the exporter checks about a checkpoint, without exporting.

    The file layout, config and sizes against ``spec``, the weights' headers, a float32 load with no
    missing, unexpected or mismatched tensor, the tokenizer and processor, then the original's fp32
    embeddings of the probe set (``bgevl.reference``) through the sanity gate: finite, and distinct
    for distinct inputs. Raises ``CheckpointError`` / ``ValidationFailed`` on the first problem."""
    from bgevl.core.parity import check_reference, max_cosine_between_rows
    from bgevl.core.probes import probe_set

    path = Path(path)
    family = family_of(spec)
    family.check_files(path, spec, report)
    embeddings = family.original(path).probe_embeddings(probe_set())
    check_reference(embeddings)
    worst = max((max_cosine_between_rows(e) or -1.0) for e in embeddings.values())
    report(f"original fp32 embeddings of the probe set ({', '.join(f'{len(e)} {k}' for k, e in embeddings.items())}): "
           f"finite and distinct (largest cosine between two probes {worst:.6f})")


def check_transformers_checkpoint(family: Any, path: Path, spec: ModelSpec, report: Any) -> None:
    """``Family.check_files`` of a checkpoint in the hub's transformers layout."""
    files = inspect_checkpoint(path, spec)
    kind = family.checkpoint_kind
    report(f"{path}: {kind.architecture}, config.json {'matches' if not spec.generated else 'is of the family of'} "
           f"--model {spec.key}{f' ({spec.hub_id})' if spec.hub_id else ''}")
    report(f"weights: {len(files.weight_files)} file(s), {files.tensors} tensors stored as {', '.join(files.stored_dtypes)}")
    model, processor = family.load(path, spec=spec)
    parameters = sum(p.numel() for p in model.parameters())
    report(f"loaded as {str(model.dtype).removeprefix('torch.')}: {parameters / 1e6:.1f}M parameters, none missing, "
           f"unexpected or mismatched")
    report(f"tokenizer {type(processor.tokenizer).__name__} ({len(processor.tokenizer)} tokens), image processor "
           f"{type(processor.image_processor).__name__}")


def any_size_spec(family: Any) -> ModelSpec:
    """The family's generated spec (a checked load of it accepts any size of the family), else its first."""
    return next((m for m in family.models if m.generated), family.models[0])


def infer_model_specs(path: Path) -> list[ModelSpec]:
    """The ``--model``s a checkpoint directory can be, read from its files (``bgevl-export --model-path DIR``
    without ``--model`` exports as the first): the family whose ``checkpoint_kind.model_type`` is
    ``config.json``'s, then the hub models of that family whose identity attributes (sizes) the config
    matches (several where hub models share an architecture, as BGE-VL-MLLM-S1/-S2 and v1.5 do), else the
    family's generated spec (checked loads accept any size of the family). A folder without ``config.json``
    is asked of the families with a layout of their own (``checkpoint_kind.config_class`` empty:
    Visualized-BGE's ``.pth``)."""
    import transformers

    from bgevl.core.registry import families

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"--model-path {path}: not a directory; pass a checkpoint directory")
    if (path / "config.json").is_file():
        raw = read_json(path / "config.json", "model config (config.json)")
        model_type = raw.get("model_type")
        for family in families().values():
            kind = family.checkpoint_kind
            if kind.config_class and kind.model_type == model_type:
                try:
                    config = getattr(transformers, kind.config_class).from_dict(raw)
                except (TypeError, ValueError, KeyError) as exc:
                    raise CheckpointError(f"{path / 'config.json'}: not a valid {kind.config_class} ({exc}); "
                                          f"download the file again") from None
                matching = [m for m in family.models if not m.generated and not _identity_differences(config, m, kind)]
                return matching or [any_size_spec(family)]
    else:
        model_type = None
    for family in families().values():
        if not family.checkpoint_kind.config_class:
            try:
                family.local_checkpoint(path)
            except BgevlError:  # CheckpointError included: not this family's layout
                continue
            return [any_size_spec(family)]
    known = sorted({f.checkpoint_kind.model_type for f in families().values() if f.checkpoint_kind.config_class})
    found = f"model_type {model_type!r}" if model_type else "no config.json"
    raise CheckpointError(f"--model-path {path}: {found}, which no model family reads (config.json model_type "
                          f"{', '.join(known)}, or a Visualized-BGE folder); pass --model")


class HubCheckpoints(CheckpointSource):
    """The checkpoint-source role for checkpoints in the hub's transformers layout (``config.json``,
    safetensors, processor files): a ``--model-path`` directory, the hub repository ``spec.hub_id``
    (cache first), checked against the family's ``checkpoint_kind``. Families subclass it next to
    :class:`~bgevl.core.family.Family`."""

    def local_checkpoint(self, path: Path) -> Path:
        return checkpoint_directory(path)

    def download(self, spec: ModelSpec) -> Path:
        return download_repository(spec)

    def check_files(self, path: Path, spec: ModelSpec, report: Any) -> None:
        check_transformers_checkpoint(self, path, spec, report)
