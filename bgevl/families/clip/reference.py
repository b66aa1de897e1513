"""BGE-VL-base/-large as their remote code computes them, in float32: the CLIP family's reference, the
dual encoders' (``bgevl.families.dual_encoder.reference``) on transformers' ``CLIPModel``."""

from __future__ import annotations

from pathlib import Path

from bgevl.families.dual_encoder.reference import OriginalDualEncoder


class OriginalClip(OriginalDualEncoder):
    """BGE-VL-base/-large as ``modeling_MMRet_CLIP.CLIPModel.encode`` computes them, in float32."""

    DESCRIPTION = ("the original's embeddings in fp32 (bgevl.families.clip.reference.OriginalClip: the checkpoint's safetensors "
                   "read directly, strict load, SDPA attention, the remote code's data_process and encode)")

    def __init__(self, directory: Path):
        super().__init__(directory, "CLIPModel")
