"""The CLIP family's PyTorch baseline for ``bgevl-bench``: the exported graphs' torch modules (transformers'
``CLIPModel`` towers with SDPA attention, what a user would run otherwise) through the family's recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from bgevl.core.family import Feeds, Request, run_steps


class ClipBaseline:
    def __init__(self, family: Any, checkpoint: Path, threads: int):
        import torch

        from bgevl.families.clip.graphs import clip_graph_specs_from_config
        from bgevl.families.clip.modules import graph_modules
        from bgevl.families.clip.preprocessing import ClipPreprocessor
        from bgevl.runtime.runners import TorchModuleRunner

        torch.set_num_threads(threads)
        model, processor = family.load(checkpoint, attn_implementation="sdpa")
        self.family = family
        self.graphs = clip_graph_specs_from_config(model.config)
        modules = graph_modules(model)
        self.runners = {name: TorchModuleRunner(spec, modules[name]) for name, spec in self.graphs.items()}
        self.preprocessor = ClipPreprocessor(processor, model.config.text_config.max_position_embeddings)

    def call(self, request: Request, feeds: Feeds) -> Callable[[], np.ndarray]:
        from bgevl.runtime.runners import runner_call

        run = runner_call(self.runners)
        return lambda: run_steps(self.family.steps(feeds, self.graphs), run)

    def gflop(self, request: Request, feeds: Feeds) -> float:
        """FLOPs of one call from torch's own counter on the baseline modules, which compute what the
        exported graphs compute; counted on the first item (same padded length) and scaled."""
        from torch.utils.flop_counter import FlopCounterMode

        first = {k: v[:1] for k, v in feeds.items()}
        with FlopCounterMode(display=False) as counter:
            self.call(request, first)()
        return counter.get_total_flops() * len(request) / 1e9
