"""BGE-VL-MLLM (``LLaVANextForEmbedding``) as its remote code computes it, in float32: the MLLM family's
reference (see ``bgevl.reference`` for what makes it independent of the export)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image

from bgevl.core.family import Original, Request
from bgevl.reference import build_fp32, load_strict, read_weights_fp32, with_pil_images

if TYPE_CHECKING:  # pragma: no cover  (types only)
    from bgevl.core.probes import ProbeSet

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


def _rename_llava_next(key: str) -> str:
    for pattern, replacement in _LLAVA_NEXT_NAMES:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    return key


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


class OriginalLlavaEmbedder(Original):
    """BGE-VL-MLLM (``LLaVANextForEmbedding``) as its remote code and model card compute it, in float32."""

    DESCRIPTION = ("the original's embeddings in fp32 (bgevl.families.mllm.reference.OriginalLlavaEmbedder: the checkpoint's "
                   "safetensors read directly, strict load, SDPA attention, the remote code's prepare_text_input and "
                   "data_process with the 512x512 resize before RGB, one item at a time, [:, -1], L2 normalize)")

    def __init__(self, directory: Path):
        from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor

        # Any: transformers declares vision_config as dict | PreTrainedConfig | None (a config once loaded)
        config: Any = LlavaNextConfig.from_pretrained(directory)
        # Any: the LlavaNextForConditionalGeneration, whose .model is called
        self.model: Any = load_strict(build_fp32(LlavaNextForConditionalGeneration, config),
                                      read_weights_fp32(directory, _rename_llava_next))
        self.processor = with_pil_images(LlavaNextProcessor.from_pretrained(directory), directory)
        # transformers 4.45's processor took the patch size and strategy from processor_config.json when
        # present and counted the CLS token of the CLIP tower; transformers 5 needs all three set
        self.processor.patch_size = config.vision_config.patch_size
        self.processor.vision_feature_select_strategy = config.vision_feature_select_strategy
        self.processor.num_additional_image_tokens = 1

    @torch.inference_mode()
    def encode_one(self, image: Image.Image | None, text: str | None, q_or_c: str, task_instruction: str | None = None,
                   image_resize: tuple[int, int] | None = ORIGINAL_MLLM_RESIZE) -> NDArray[Any]:
        if image is not None:
            image = (image.resize(image_resize) if image_resize else image).convert("RGB")
        prompt = original_prompt(text, image is not None, q_or_c, task_instruction)
        inputs = self.processor(images=[image] if image is not None else None, text=[prompt], return_tensors="pt", padding=True)
        hidden = self.model.model(**inputs, use_cache=False).last_hidden_state
        return torch.nn.functional.normalize(hidden[:, -1, :], dim=-1)[0].numpy().astype(np.float32)

    def encode(self, items: Sequence[tuple[Image.Image | None, str | None, str]], task_instruction: str | None = None,
               image_resize: tuple[int, int] | None = ORIGINAL_MLLM_RESIZE) -> NDArray[Any]:
        """One embedding per (image or None, text or None, "query"/"candidate") item; queries carry
        ``task_instruction``."""
        return np.stack([
            self.encode_one(image, text, role, task_instruction if role in ("q", "query") else None, image_resize)
            for image, text, role in items])

    def probe_embeddings(self, probes: ProbeSet, task_instruction: str | None = None) -> dict[str, NDArray[Any]]:
        """The original's embeddings of a ``bgevl.core.probes.ProbeSet``: image-only and text-only candidates,
        composed queries with ``task_instruction``."""
        return {"images": self.encode([(im, None, "candidate") for im in probes.images]),
                "texts": self.encode([(None, t, "candidate") for t in probes.texts]),
                "composed": self.encode([(probes.images[i], probes.texts[j], "query") for i, j in probes.composed],
                                        task_instruction)}

    def embed(self, request: Request) -> NDArray[Any]:
        """Items of a request pair up; images or texts may be None per item."""
        n = len(request)
        role = request.role or "candidate"
        items = [(request.images[i] if request.images is not None else None,
                  request.texts[i] if request.texts is not None else None, role) for i in range(n)]
        return self.encode(items, request.instruction)
