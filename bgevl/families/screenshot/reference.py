"""BGE-VL-Screenshot as the original computes it, in float32: the screenshot family's reference (see
``bgevl.reference`` for what makes it independent of the export).

transformers' own ``Qwen2_5_VLModel`` forward (its vision tower with the per-segment attention loop, its
``get_rope_index`` M-RoPE positions, ``masked_scatter`` of the image features), built from the checkpoint's
safetensors read directly, one item at a time (no padding), and the final-norm hidden state of the last token,
L2-normalized. The hub's remote forward (``BGE_VL_Screenshot``) runs only on transformers 4.49-4.51, so the
forward is the stock model's, as sentence-transformers users get it (representax's oracle takes the same route);
the prompts are the declared ones (``ScreenshotPrompts``), rendered by transformers' processor.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from numpy.typing import NDArray

from bgevl.core.family import CANDIDATE, Original, Request
from bgevl.reference import build_fp32, load_strict, read_weights_fp32

if TYPE_CHECKING:  # pragma: no cover  (types only)
    from bgevl.core.probes import ProbeSet
    from bgevl.families.screenshot.preprocessing import ScreenshotPrompts

#: released Qwen2.5-VL names (before transformers 4.52) and transformers 5 save names -> ``Qwen2_5_VLModel``'s
_QWEN2_5_VL_NAMES = ((r"^model\.(language_model|visual)\.", r"\1."), (r"^model\.", "language_model."))


def _rename(key: str) -> str:
    for pattern, replacement in _QWEN2_5_VL_NAMES:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    return key


class OriginalScreenshot(Original):
    DESCRIPTION = ("the original's embeddings in fp32 (bgevl.families.screenshot.reference.OriginalScreenshot: the "
                   "checkpoint's safetensors read directly, strict load, transformers' Qwen2_5_VLModel forward with "
                   "get_rope_index positions, one item at a time, last token, L2 normalize)")

    def __init__(self, directory: Path, prompts: "ScreenshotPrompts | None" = None, *, min_pixels: int | None = None,
                 max_pixels: int | None = None):
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

        from bgevl.families.screenshot.preprocessing import ScreenshotPrompts
        from bgevl.families.screenshot.processor import ImageTextQwenProcessor

        config: Any = Qwen2_5_VLConfig.from_pretrained(directory)
        # the LM head (tied to the token embeddings, or absent) plays no part in an embedding
        shards = ({k: v for k, v in shard.items() if k != "lm_head.weight"} for shard in read_weights_fp32(directory, _rename))
        self.model: Any = load_strict(build_fp32(Qwen2_5_VLModel, config), shards)
        self.processor = ImageTextQwenProcessor.from_directory(directory, min_pixels=min_pixels, max_pixels=max_pixels)
        self.prompts = prompts or ScreenshotPrompts()

    @torch.inference_mode()
    def encode_one(self, image: Any, text: str | None, role: str, instruction: str | None) -> NDArray[Any]:
        from bgevl.core.preprocessing import load_image

        if role == CANDIDATE:
            instruction = self.prompts.candidate_instruction
        messages = self.prompts.messages(text, image is not None, instruction)
        prompt = self.processor.apply_chat_template(messages, tokenize=False,
                                                    add_generation_prompt=self.prompts.add_generation_prompt)
        images = [load_image(image)] if image is not None else None
        inputs = self.processor(text=[prompt], images=images, return_tensors="pt")
        positions = None
        if images:
            positions, _ = self.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                     inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])
        hidden = self.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                            pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"),
                            position_ids=positions, use_cache=False).last_hidden_state
        return torch.nn.functional.normalize(hidden[:, -1].float(), dim=-1)[0].numpy()

    def embed(self, request: Request) -> NDArray[Any]:
        role = request.role or CANDIDATE
        return np.stack([self.encode_one(request.images[i] if request.images is not None else None,
                                         request.texts[i] if request.texts is not None else None, role,
                                         request.instruction) for i in range(len(request))])

    def probe_embeddings(self, probes: ProbeSet) -> dict[str, NDArray[Any]]:
        from bgevl.families.screenshot.preprocessing import SCREENSHOT_QUERY_INSTRUCTION

        return {"images": self.embed(Request(probes.images, None, CANDIDATE)),
                "texts": self.embed(Request(None, probes.texts, CANDIDATE)),
                "composed": self.embed(Request(probes.composed_images(), probes.composed_texts(), "query",
                                               SCREENSHOT_QUERY_INSTRUCTION))}
