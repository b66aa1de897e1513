"""The Visualized-BGE family's PyTorch baseline for ``bgevl-bench``: the exported graphs' torch modules
(the text model with SDPA attention, what a user would run otherwise) through the family's recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from bgevl.core.family import Feeds, Request, run_steps


class VisualizedBaseline:
    def __init__(self, family: Any, checkpoint: Path, threads: int):
        import torch

        from bgevl.families.visualized.modeling import graph_modules
        from bgevl.families.visualized.preprocessing import VisualizedPreprocessor
        from bgevl.runtime.runners import TorchModuleRunner
        from bgevl.core.specs import DEFAULT_MAX_BATCH, DEFAULT_MAX_SEQUENCE, DEFAULT_OPT_BATCH

        torch.set_num_threads(threads)
        model, tokenizer = family.load(checkpoint, attn_implementation="sdpa")
        layout = family.layout_of(model, DEFAULT_MAX_SEQUENCE)
        self.family = family
        self.graphs = family.graph_specs(model, layout, DEFAULT_OPT_BATCH, DEFAULT_MAX_BATCH)
        modules = graph_modules(model)
        self.runners = {name: TorchModuleRunner(spec, modules[name]) for name, spec in self.graphs.items()}
        self.preprocessor = VisualizedPreprocessor(tokenizer, layout)

    def call(self, request: Request, feeds: Feeds) -> Callable[[], np.ndarray]:
        from bgevl.runtime.runners import runner_call

        run = runner_call(self.runners)
        return lambda: run_steps(self.family.steps(feeds, self.graphs), run)

    def gflop(self, request: Request, feeds: Feeds) -> float:
        """FLOPs of one call from torch's own counter on the baseline modules; counted on the first item and scaled."""
        from torch.utils.flop_counter import FlopCounterMode

        first = {k: v[:1] for k, v in feeds.items()}
        with FlopCounterMode(display=False) as counter:
            self.call(request, first)()
        return counter.get_total_flops() * len(request) / 1e9
