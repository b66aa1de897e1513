"""A dual encoder as its original code computes it, in float32: every dual-encoder family's reference
(see ``bgevl.reference`` for what makes it independent of the export).

BGE-VL-base/-large: ``modeling_MMRet_CLIP.CLIPModel.encode`` (the hub's remote code, transformers 4.45's
CLIPModel plus ``encode``): ``data_process`` runs ``processor(text=..., padding=True)`` and
``Image.open(p).convert("RGB")``; ``encode_image`` / ``encode_text`` normalize ``get_*_features``;
``encode_multimodal`` normalizes ``get_text_features + get_image_features``. Other dual encoders run the
same way with their own class and declared text padding (SigLIP: ``padding="max_length"``, as its model
cards and transformers' ``SiglipModel`` docs call the processor).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image

from bgevl.core.family import Original, Request
from bgevl.core.specs import TextPadding
from bgevl.families.dual_encoder.modules import pooled
from bgevl.reference import build_fp32, load_strict, read_weights_fp32, with_pil_images

if TYPE_CHECKING:  # pragma: no cover  (types only)
    from bgevl.core.probes import ProbeSet


class OriginalDualEncoder(Original):
    """``model_class``'s ``get_image_features`` / ``get_text_features`` on its processor's own outputs, in
    float32; composed queries (``fusion``) by BGE-VL's score fusion of the unnormalized features."""

    DESCRIPTION = ("the original's embeddings in fp32 (bgevl.families.dual_encoder.reference.OriginalDualEncoder: "
                   "the checkpoint's safetensors read directly, strict load, SDPA attention, the processor's own "
                   "preprocessing, get_image_features / get_text_features, L2 normalize)")

    def __init__(self, directory: Path, model_class: str, text: TextPadding = TextPadding(), fusion: bool = True):
        import transformers

        model_type = getattr(transformers, model_class)
        config = model_type.config_class.from_pretrained(directory)
        # the transformers model (``model_class``): its get_image_features / get_text_features
        self.model: Any = load_strict(build_fp32(model_type, config), read_weights_fp32(directory))
        # the original loads the processor with from_pretrained; transformers 4.45 had only the PIL image processor
        # (transformers leaves from_pretrained unannotated)
        processor = transformers.AutoProcessor.from_pretrained(directory)  # type: ignore[no-untyped-call]
        self.processor = with_pil_images(processor, directory)
        self.text = text
        self.fusion = fusion

    @torch.inference_mode()
    def _image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        return pooled(self.model.get_image_features(pixel_values=pixels.float()))

    @torch.inference_mode()
    def _text_features(self, texts: Sequence[str]) -> torch.Tensor:
        if self.text.fixed_length:
            tokens = self.processor(text=list(texts), return_tensors="pt", padding="max_length",
                                    max_length=self.text.fixed_length, truncation=True)
        else:
            tokens = self.processor(text=list(texts), return_tensors="pt", padding=True)
        return pooled(self.model.get_text_features(**{name: tokens[name] for name in self.text.input_names}))

    def probe_embeddings(self, probes: ProbeSet) -> dict[str, NDArray[Any]]:
        """The original's embeddings of a ``bgevl.core.probes.ProbeSet``: images, texts and composed queries."""
        out = {"images": self.encode(images=probes.images), "texts": self.encode(text=probes.texts)}
        if self.fusion:
            out["composed"] = self.encode(images=probes.composed_images(), text=probes.composed_texts())
        return out

    def encode(self, images: Sequence[Image.Image] | None = None, text: Sequence[str] | None = None) -> NDArray[Any]:
        """``encode_image`` / ``encode_text`` / ``encode_multimodal`` of BGE-VL's remote code."""
        normalize = torch.nn.functional.normalize
        if images is not None and text is not None:
            if not self.fusion:
                raise ValueError("this dual encoder has no composed queries")
            out = normalize(self._text_features(text) + self._image_features(images), dim=-1)
        elif images is not None:
            out = normalize(self._image_features(images), dim=-1)
        elif text is not None:
            out = normalize(self._text_features(text), dim=-1)
        else:
            raise ValueError("nothing to encode: pass images, text or both")
        return out.numpy().astype(np.float32)

    def embed(self, request: Request) -> NDArray[Any]:
        return self.encode(images=request.images, text=request.texts)
