"""What the benchmark runs: workloads (inputs per batch size) and the backends that embed them.

Two levels, never mixed in one ratio:

* **model** level: preprocessed tensors in, embeddings out. PyTorch eager (each family's
  ``torch_baseline``: transformers' ``CLIPModel`` / ``LlavaNextModel`` with its default SDPA
  attention, what a user would run otherwise) against ONNX Runtime on the fp32/fp16/int8 exports (and the CUDA/TensorRT
  providers or TensorRT engines where present). ``x vs PyTorch`` is measured here.
* **end-to-end** level: encoded image files and strings in, embeddings out, preprocessing
  included: ``bgevl.runtime`` (fp32 export) against the Triton server of the Triton issue
  (python-backend ONNX Runtime encoders on CPU). Triton's overhead is measured here.

Inputs are synthetic (``bgevl.probes``: varied sizes and aspect ratios, captions of varied
length); with random-weight checkpoints the speed of the architectures is what is measured.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bgevl.families.base import Request, run_steps
from bgevl.probes import PROBE_TEXTS, synthetic_images
from bgevl.vectors import l2_normalize

WORKLOADS = ("image", "text", "composed")
BENCH_SEED = 424242


@dataclass
class Case:
    """One (workload, batch size): the request (raw inputs, role, instruction), the model-level feeds
    (the family's preprocessing) and the FLOPs of one call."""

    model: str
    workload: str
    batch: int
    request: Request
    feeds: dict[str, Any] = field(default_factory=dict)
    gflop: float = float("nan")


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def raw_inputs(workload: str, batch: int) -> tuple[list[bytes] | None, list[str] | None]:
    images = [_png(im) for im in synthetic_images(batch, BENCH_SEED)] if workload in ("image", "composed") else None
    texts = [PROBE_TEXTS[i % len(PROBE_TEXTS)] for i in range(batch)] if workload in ("text", "composed") else None
    return images, texts


class BenchModel:
    """A model of one family in the benchmark: its PyTorch baseline (``Family.torch_baseline``) and, for
    the graph backends, the same requests through the family's recipe."""

    def __init__(self, family: Any, checkpoint: Path, threads: int):
        self.family = family
        self.baseline = family.torch_baseline(checkpoint, threads)

    def case(self, key: str, workload: str, batch: int) -> Case:
        images, texts = raw_inputs(workload, batch)
        request = self.family.bench_request(workload, images, texts)
        case = Case(key, workload, batch, request, self.baseline.preprocessor.prepare(request))
        case.gflop = self.baseline.gflop(request, case.feeds)
        return case

    def torch_call(self, case: Case) -> Callable[[], np.ndarray]:
        return self.baseline.call(case.request, case.feeds)

    def graphs_call(self, runners: dict, case: Case) -> Callable[[], np.ndarray]:
        """The exported graphs (ONNX Runtime or TensorRT runners) on the same feeds, through the family's recipe."""
        from bgevl.runtime.runners import runner_call

        graphs = {name: runner.spec for name, runner in runners.items()}
        run = runner_call(runners)
        return lambda: run_steps(self.family.steps(case.feeds, graphs), run)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(l2_normalize(a) * l2_normalize(b), axis=-1)))
