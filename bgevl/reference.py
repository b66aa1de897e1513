"""Shared parts of the original models' references (each family's ``reference`` module holds its own).

Every export is checked against what BGE-VL's own remote code computes, not against the model the
export was traced from. What makes this reference independent of the export path:

* **weights**: read from the checkpoint's safetensors files directly (the index's shards or the
  single file, one at a time), cast to float32 and loaded into a freshly built model, every tensor
  accounted for (none missing, none unexpected); the
  export loads through ``from_pretrained`` with its load report. Any tensor the architecture lacks
  or does not know fails here.
* **float32 and SDPA attention**, as the remote code runs under transformers 4.45 (it loads with
  ``AutoModel.from_pretrained`` without a dtype: float32; ``_supports_sdpa``); the export traces
  eager attention.
* **the original's preprocessing**, spelled out from its ``data_process`` rather than through
  ``bgevl.runtime``'s preprocessors, and the original's pooling and normalization.

Sources (public files; the line numbers are those of the versions read):

* CLIP (``bgevl.families.clip.reference``): FlagOpen/FlagEmbedding ``research/BGE_VL/modeling_MMRet_CLIP.py`` (the hub's
  ``modeling_MMRet_CLIP.py``): ``data_process`` L1282-1307 (``Image.open(p).convert("RGB")``,
  ``processor(text=..., padding=True)`` without truncation), ``encode_image`` / ``encode_text``
  (``normalize(get_*_features)``), ``encode_multimodal`` L1273-1280
  (``normalize(get_text_features + get_image_features)``).
* MLLM (``bgevl.families.mllm.reference``): BAAI/BGE-VL-MLLM-S1 ``modeling_llavanext_for_embedding.py``: ``prepare_text_input``,
  ``data_process`` (``Image.open(p).resize((512, 512)).convert("RGB")``), the Mistral forward
  replaced to return the last hidden state after the final norm, and the caller's
  ``[:, -1, :]`` + ``F.normalize``. The remote code cannot batch text-only items and reads position
  -1 whatever the padding side, so this reference runs one item at a time, where -1 is exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch

def read_weights_fp32(directory: Path, rename=lambda key: key) -> Iterator[dict[str, torch.Tensor]]:
    """The checkpoint's safetensors files one at a time, every tensor as float32 under ``rename(key)``
    (one shard in memory beside the model, not the whole state dict)."""
    from safetensors.torch import load_file

    from bgevl.checkpoints import weight_files

    for file in weight_files(Path(directory)):
        yield {rename(k): (v.float() if v.is_floating_point() else v) for k, v in load_file(str(file)).items()}


def load_strict(model: torch.nn.Module, shards: Iterator[dict[str, torch.Tensor]]) -> torch.nn.Module:
    """Every tensor of the files into ``model``, shard by shard, then the strict check over all of them:
    a tensor the model lacks, or a model tensor no file had, is an error."""
    expected = set(model.state_dict())
    seen: set[str] = set()
    for shard in shards:
        # position_ids are non-persistent buffers in transformers >= 4.31; files saved before keep them
        shard = {k: v for k, v in shard.items() if not k.endswith("position_ids")}
        unexpected = sorted(set(shard) - expected)
        if unexpected:
            raise RuntimeError(f"Unexpected key(s) in state_dict: {', '.join(unexpected[:5])}")
        model.load_state_dict(shard, strict=False)
        seen |= set(shard)
    missing = sorted(expected - seen)
    if missing:
        raise RuntimeError(f"Missing key(s) in state_dict: {', '.join(missing[:5])}")
    return model.float().eval()


def build_fp32(model_class: Any, config: Any) -> Any:
    """``model_class(config)`` in float32 with SDPA attention, without the random initialization (every
    weight is read from the files next)."""
    from transformers.initialization import no_init_weights

    config._attn_implementation = "sdpa"
    with no_init_weights(), torch.random.fork_rng():
        return model_class(config).float()


def with_pil_images(processor: Any, directory: Path) -> Any:
    """The processor with its image processor on the PIL backend (transformers 4.45 had no other)."""
    from transformers import AutoImageProcessor

    processor.image_processor = AutoImageProcessor.from_pretrained(directory, backend="pil")
    return processor
