"""The original models' embeddings, computed independently of the exporter: the reference of validation.

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

Sources (``../shared/reference/hub-checkpoints.md`` has the line numbers):

* CLIP: FlagOpen/FlagEmbedding ``research/BGE_VL/modeling_MMRet_CLIP.py`` (the hub's
  ``modeling_MMRet_CLIP.py``): ``data_process`` L1282-1307 (``Image.open(p).convert("RGB")``,
  ``processor(text=..., padding=True)`` without truncation), ``encode_image`` / ``encode_text``
  (``normalize(get_*_features)``), ``encode_multimodal`` L1273-1280
  (``normalize(get_text_features + get_image_features)``).
* MLLM: BAAI/BGE-VL-MLLM-S1 ``modeling_llavanext_for_embedding.py``: ``prepare_text_input``,
  ``data_process`` (``Image.open(p).resize((512, 512)).convert("RGB")``), the Mistral forward
  replaced to return the last hidden state after the final norm, and the caller's
  ``[:, -1, :]`` + ``F.normalize``. The remote code cannot batch text-only items and reads position
  -1 whatever the padding side, so this reference runs one item at a time, where -1 is exact.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

#: BGE-VL-MLLM's ``data_process`` resizes every image to this (width, height) before converting it.
ORIGINAL_MLLM_RESIZE = (512, 512)

#: transformers 4.45 ``LlavaNextForConditionalGeneration`` names (the hub files) and transformers 5
#: save names -> transformers 5 module names. First match wins.
_LLAVA_NEXT_NAMES = (
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^vision_tower\.vision_model\.", "model.vision_tower."),
    (r"^vision_tower\.", "model.vision_tower."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
    (r"^image_newline$", "model.image_newline"),
)


def read_weights_fp32(directory: Path, rename=lambda key: key) -> Iterator[dict[str, torch.Tensor]]:
    """The checkpoint's safetensors files one at a time, every tensor as float32 under ``rename(key)``
    (one shard in memory beside the model, not the whole state dict)."""
    from safetensors.torch import load_file

    from bgevl.checkpoints import weight_files

    for file in weight_files(Path(directory)):
        yield {rename(k): (v.float() if v.is_floating_point() else v) for k, v in load_file(str(file)).items()}


def _load_strict(model: torch.nn.Module, shards: Iterator[dict[str, torch.Tensor]]) -> torch.nn.Module:
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


def _build(model_class: Any, config: Any) -> Any:
    """``model_class(config)`` in float32 with SDPA attention, without the random initialization (every
    weight is read from the files next)."""
    from transformers.initialization import no_init_weights

    config._attn_implementation = "sdpa"
    with no_init_weights(), torch.random.fork_rng():
        return model_class(config).float()


def _with_pil_images(processor: Any, directory: Path) -> Any:
    """The processor with its image processor on the PIL backend (transformers 4.45 had no other)."""
    from transformers import AutoImageProcessor

    processor.image_processor = AutoImageProcessor.from_pretrained(directory, backend="pil")
    return processor


def _rename_llava_next(key: str) -> str:
    for pattern, replacement in _LLAVA_NEXT_NAMES:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    return key


class OriginalClip:
    """BGE-VL-base/-large as ``modeling_MMRet_CLIP.CLIPModel.encode`` computes them, in float32."""

    DESCRIPTION = ("the original's embeddings in fp32 (bgevl.reference.OriginalClip: the checkpoint's safetensors "
                   "read directly, strict load, SDPA attention, the remote code's data_process and encode)")

    def __init__(self, directory: Path):
        from transformers import CLIPConfig, CLIPModel, CLIPProcessor

        self.model = _load_strict(_build(CLIPModel, CLIPConfig.from_pretrained(directory)), read_weights_fp32(directory))
        # set_processor: CLIPProcessor.from_pretrained(name); 4.45 had only the PIL image processor
        self.processor = _with_pil_images(CLIPProcessor.from_pretrained(directory), directory)

    @torch.inference_mode()
    def _image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        return self.model.get_image_features(pixel_values=pixels.float()).pooler_output

    @torch.inference_mode()
    def _text_features(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.processor(text=list(texts), return_tensors="pt", padding=True)
        return self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output

    def probe_embeddings(self, probes: Any) -> dict[str, np.ndarray]:
        """The original's embeddings of a ``bgevl.probes.ProbeSet``: images, texts, composed queries."""
        return {"images": self.encode(images=probes.images), "texts": self.encode(text=probes.texts),
                "composed": self.encode(images=probes.composed_images(), text=probes.composed_texts())}

    def encode(self, images: Sequence[Image.Image] | None = None, text: Sequence[str] | None = None) -> np.ndarray:
        """``encode_image`` / ``encode_text`` / ``encode_multimodal`` of the remote code."""
        normalize = torch.nn.functional.normalize
        if images is not None and text is not None:
            out = normalize(self._text_features(text) + self._image_features(images), dim=-1)
        elif images is not None:
            out = normalize(self._image_features(images), dim=-1)
        else:
            out = normalize(self._text_features(text), dim=-1)
        return out.numpy().astype(np.float32)


def original_prompt(text: str | None, has_image: bool, q_or_c: str, task_instruction: str | None) -> str:
    """``LLaVANextForEmbedding.prepare_text_input``, as the remote code writes it."""
    if q_or_c in ("q", "query"):
        if task_instruction is None:
            prompt = "[INST] \n <instruct>  <query>"
        else:
            prompt = f"[INST] \n <instruct> {task_instruction} <query> "
    else:
        prompt = "[INST] "
    if text is not None:
        prompt = f"{prompt} {text} \n"
    if has_image:
        prompt = f"{prompt} <image>"
    return f"{prompt} [/INST]"


class OriginalLlavaEmbedder:
    """BGE-VL-MLLM (``LLaVANextForEmbedding``) as its remote code and model card compute it, in float32."""

    DESCRIPTION = ("the original's embeddings in fp32 (bgevl.reference.OriginalLlavaEmbedder: the checkpoint's "
                   "safetensors read directly, strict load, SDPA attention, the remote code's prepare_text_input and "
                   "data_process with the 512x512 resize before RGB, one item at a time, [:, -1], L2 normalize)")

    def __init__(self, directory: Path):
        from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor

        config = LlavaNextConfig.from_pretrained(directory)
        self.model = _load_strict(_build(LlavaNextForConditionalGeneration, config),
                                  read_weights_fp32(directory, _rename_llava_next))
        self.processor = _with_pil_images(LlavaNextProcessor.from_pretrained(directory), directory)
        # transformers 4.45's processor took the patch size and strategy from processor_config.json when
        # present and counted the CLS token of the CLIP tower; transformers 5 needs all three set
        self.processor.patch_size = config.vision_config.patch_size
        self.processor.vision_feature_select_strategy = config.vision_feature_select_strategy
        self.processor.num_additional_image_tokens = 1

    @torch.inference_mode()
    def encode_one(self, image: Image.Image | None, text: str | None, q_or_c: str, task_instruction: str | None = None,
                   image_resize: tuple[int, int] | None = ORIGINAL_MLLM_RESIZE) -> np.ndarray:
        if image is not None:
            image = (image.resize(image_resize) if image_resize else image).convert("RGB")
        prompt = original_prompt(text, image is not None, q_or_c, task_instruction)
        inputs = self.processor(images=[image] if image is not None else None, text=[prompt], return_tensors="pt", padding=True)
        hidden = self.model.model(**inputs, use_cache=False).last_hidden_state
        return torch.nn.functional.normalize(hidden[:, -1, :], dim=-1)[0].numpy().astype(np.float32)

    def encode(self, items: Sequence[tuple[Image.Image | None, str | None, str]], task_instruction: str | None = None,
               image_resize: tuple[int, int] | None = ORIGINAL_MLLM_RESIZE) -> np.ndarray:
        """One embedding per (image or None, text or None, "query"/"candidate") item; queries carry
        ``task_instruction``."""
        return np.stack([
            self.encode_one(image, text, role, task_instruction if role in ("q", "query") else None, image_resize)
            for image, text, role in items])

    def probe_embeddings(self, probes: Any, task_instruction: str | None = None) -> dict[str, np.ndarray]:
        """The original's embeddings of a ``bgevl.probes.ProbeSet``: image-only and text-only candidates,
        composed queries with ``task_instruction``."""
        return {"images": self.encode([(im, None, "candidate") for im in probes.images]),
                "texts": self.encode([(None, t, "candidate") for t in probes.texts]),
                "composed": self.encode([(probes.images[i], probes.texts[j], "query") for i, j in probes.composed],
                                        task_instruction)}


#: The original model of each family.
ORIGINALS = {"clip": OriginalClip, "mllm": OriginalLlavaEmbedder}
