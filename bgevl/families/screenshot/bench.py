"""The screenshot family's PyTorch baseline for ``bgevl-bench``: transformers' ``Qwen2_5_VLModel`` forward on its
processor's own outputs, batched and left-padded, with ``get_rope_index`` positions (what a user of transformers
runs), the last token's final-norm hidden state, L2-normalized."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from numpy.typing import NDArray

from bgevl.core.family import Feeds, Request
from bgevl.core.specs import DEFAULT_MAX_SEQUENCE

if TYPE_CHECKING:  # pragma: no cover  (types only)
    from bgevl.core.family import Family


class ScreenshotBaseline:
    def __init__(self, family: Family, checkpoint: Path, threads: int, max_sequence: int = DEFAULT_MAX_SEQUENCE):
        import torch

        from bgevl.families.screenshot.layout import VisionGeometry
        from bgevl.families.screenshot.preprocessing import ScreenshotPreprocessor, ScreenshotPrompts

        torch.set_num_threads(threads)
        model: Any
        model, self.processor = family.load(checkpoint, attn_implementation="sdpa")
        self.model: Any = model.model
        self.preprocessor = ScreenshotPreprocessor(self.processor, VisionGeometry.from_config(model.config.vision_config),
                                                   ScreenshotPrompts(), max_sequence)

    def call(self, request: Request, feeds: Feeds) -> Callable[[], NDArray[Any]]:
        prompts, images = self.preprocessor.prompts_and_images(self.preprocessor.check(request))
        inputs = self.processor(text=prompts, images=images or None, padding=True, return_tensors="pt")
        return lambda: self._forward(inputs)

    def _forward(self, inputs: Any) -> NDArray[Any]:
        import torch

        with torch.inference_mode():
            positions, _ = self.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                     inputs.get("image_grid_thw"), attention_mask=inputs["attention_mask"])
            hidden = self.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"),
                                position_ids=positions, use_cache=False).last_hidden_state
            pooled: NDArray[Any] = torch.nn.functional.normalize(hidden[:, -1].float(), dim=-1).numpy()  # left padding
        return pooled

    def gflop(self, request: Request, feeds: Feeds) -> float:
        from bgevl.runtime.baseline import call_gflop

        return call_gflop(self.call(request, feeds))
