"""BGE-VL-base/-large as their remote code computes them, in float32: the CLIP family's reference
(see ``bgevl.reference`` for what makes it independent of the export)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from bgevl.core.family import Original, Request
from bgevl.reference import build_fp32, load_strict, read_weights_fp32, with_pil_images


class OriginalClip(Original):
    """BGE-VL-base/-large as ``modeling_MMRet_CLIP.CLIPModel.encode`` computes them, in float32."""

    DESCRIPTION = ("the original's embeddings in fp32 (bgevl.families.clip.reference.OriginalClip: the checkpoint's safetensors "
                   "read directly, strict load, SDPA attention, the remote code's data_process and encode)")

    def __init__(self, directory: Path):
        from transformers import CLIPConfig, CLIPModel, CLIPProcessor

        self.model = load_strict(build_fp32(CLIPModel, CLIPConfig.from_pretrained(directory)), read_weights_fp32(directory))
        # set_processor: CLIPProcessor.from_pretrained(name); 4.45 had only the PIL image processor
        self.processor = with_pil_images(CLIPProcessor.from_pretrained(directory), directory)

    @torch.inference_mode()
    def _image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        return self.model.get_image_features(pixel_values=pixels.float()).pooler_output

    @torch.inference_mode()
    def _text_features(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.processor(text=list(texts), return_tensors="pt", padding=True)
        return self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output

    def probe_embeddings(self, probes: Any) -> dict[str, np.ndarray]:
        """The original's embeddings of a ``bgevl.core.probes.ProbeSet``: images, texts, composed queries."""
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

    def embed(self, request: Request) -> np.ndarray:
        return self.encode(images=request.images, text=request.texts)
