"""The PyTorch baseline of ``bgevl-bench`` for families whose graphs are torch modules run by a recipe (dual
encoders, Visualized-BGE): the export's own modules (``GraphExport.prepare_export`` + ``graph_modules``,
with transformers' default SDPA attention, what a user would run otherwise) through the family's recipe,
on the export's preprocessor. One implementation for every such family: nothing is rebuilt per family."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from bgevl.core.family import Feeds, Request, run_steps
from bgevl.core.options import ExportOptions


class GraphModulesBaseline:
    def __init__(self, family: Any, checkpoint: Path, threads: int):
        import torch

        from bgevl.checkpoints import any_size_spec
        from bgevl.runtime.runners import TorchModuleRunner

        torch.set_num_threads(threads)
        opt_batch, max_batch = family.default_batch
        options = ExportOptions(output=Path(checkpoint), opt_batch=opt_batch, max_batch=max_batch, attn_implementation="sdpa")
        exported = family.prepare_export(Path(checkpoint), any_size_spec(family), options)
        self.family = family
        self.graphs = exported.graphs
        modules = family.graph_modules(exported)
        self.runners = {name: TorchModuleRunner(spec, modules[name]) for name, spec in self.graphs.items()}
        self.preprocessor = exported.preprocessor

    def call(self, request: Request, feeds: Feeds) -> Callable[[], np.ndarray]:
        from bgevl.runtime.runners import runner_call

        run = runner_call(self.runners)
        return lambda: run_steps(self.family.steps(feeds, self.graphs), run)

    def gflop(self, request: Request, feeds: Feeds) -> float:
        """FLOPs of one call from torch's own counter on the baseline modules, which compute what the
        exported graphs compute; counted on the first item (same padded length) and scaled."""
        first = {k: v[:1] for k, v in feeds.items()}
        return call_gflop(self.call(request, first)) * len(request)


def call_gflop(call: Callable[[], Any]) -> float:
    """The GFLOP of one ``call()`` by torch's own counter (the PyTorch baselines of the decoder families, whose
    prepared call runs transformers' forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        call()
    flops: int = counter.get_total_flops()
    return flops / 1e9
