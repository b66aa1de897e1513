"""The MLLM family's PyTorch baseline for ``bgevl-bench``: transformers' ``LlavaNextModel`` forward on the
processor's own outputs (what BGE-VL-MLLM's remote code runs), last token, L2-normalized."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from numpy.typing import NDArray

from bgevl.core.family import Feeds, Request
from bgevl.core.specs import DEFAULT_MAX_SEQUENCE

if TYPE_CHECKING:  # pragma: no cover  (types only)
    from bgevl.core.family import Family


class MllmBaseline:
    def __init__(self, family: Family, checkpoint: Path, threads: int, max_sequence: int = DEFAULT_MAX_SEQUENCE):
        import torch

        from bgevl.families.mllm.preprocessing import ImageLayout, MllmPreprocessor

        torch.set_num_threads(threads)
        self.model, self.processor = family.load(checkpoint, attn_implementation="sdpa")
        self.preprocessor = MllmPreprocessor(self.processor, ImageLayout.from_config(self.model.config), max_sequence)

    def call(self, request: Request, feeds: Feeds) -> Callable[[], NDArray[Any]]:
        from bgevl.families.mllm.modules import reference_embeddings

        request = self.preprocessor.check(request)
        assert request.role is not None  # check() sets it
        prompts = self.preprocessor.prompts(request.images, request.texts, request.role, request.instruction)
        images = self.preprocessor.load_images(request.images) if request.images else None
        inputs = dict(self.processor(text=prompts, images=images, padding=True, return_tensors="np"))
        return lambda: reference_embeddings(self.model, inputs)

    def gflop(self, request: Request, feeds: Feeds) -> float:
        from bgevl.runtime.baseline import call_gflop

        return call_gflop(self.call(request, feeds))
