"""What the benchmark runs: workloads (inputs per batch size) and the backends that embed them.

Two levels, never mixed in one ratio:

* **model** level: preprocessed tensors in, embeddings out. PyTorch eager (each family's
  ``torch_baseline``: transformers' ``CLIPModel`` / ``LlavaNextModel`` with its default SDPA
  attention, what a user would run otherwise) against ONNX Runtime on the fp32/fp16/int8 exports (and the CUDA/TensorRT
  providers or TensorRT engines where present). ``x vs PyTorch`` is measured here.
* **end-to-end** level: encoded image files and strings in, embeddings out, preprocessing
  included: ``bgevl.runtime`` (fp32 export) against the Triton server of the Triton issue
  (python-backend ONNX Runtime encoders on CPU). Triton's overhead is measured here.

Inputs are synthetic (``bgevl.core.probes``: varied sizes and aspect ratios, captions of varied
length); with random-weight checkpoints the speed of the architectures is what is measured.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bgevl.core.family import Request, run_steps
from bgevl.core.probes import PROBE_TEXTS, synthetic_images
from bgevl.core.vectors import l2_normalize

WORKLOADS = ("image", "text", "composed")
BENCH_SEED = 424242


def split_workload(workload: str) -> tuple[str, tuple[int, int] | None]:
    """A workload -> its item kind and image size: ``image`` (the probe images' own sizes) or ``image@1920x1080``
    (every image resized to that size: a model whose images become a number of tokens that grows with their size,
    like BGE-VL-Screenshot, is measured at the sizes it will see). Refused in one line when malformed."""
    from bgevl.core.errors import BgevlError

    kind, _, size = workload.partition("@")
    if kind not in WORKLOADS:
        raise BgevlError(f"--workloads: {workload!r}; choose from {', '.join(WORKLOADS)}, an image kind optionally "
                         f"with a size (image@1920x1080)")
    if not size:
        return kind, None
    width, _, height = size.partition("x")
    if kind == "text" or not (width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
        raise BgevlError(f"--workloads: {workload!r}; a size is WIDTHxHEIGHT in pixels, on image or composed")
    return kind, (int(width), int(height))


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
    #: the tokens the batch's feeds hold (``Family.prompt_tokens``: text, and image tokens where images go into
    #: the sequence), for tokens/s
    tokens: int = 0


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def raw_inputs(workload: str, batch: int) -> tuple[list[bytes] | None, list[str] | None]:
    kind, size = split_workload(workload)
    images = [_png(im if size is None else im.resize(size)) for im in synthetic_images(batch, BENCH_SEED)] \
        if kind in ("image", "composed") else None
    texts = [PROBE_TEXTS[i % len(PROBE_TEXTS)] for i in range(batch)] if kind in ("text", "composed") else None
    return images, texts


class BenchModel:
    """A model of one family in the benchmark: its PyTorch baseline (``Family.torch_baseline``) and, for
    the graph backends, the same requests through the family's recipe. ``float_export``: the export whose
    graphs the FLOPs are counted on (``bgevl.benchmarks.flops``); without one, torch's counter on the baseline."""

    def __init__(self, family: Any, checkpoint: Path, threads: int, float_export: Path | None = None):
        from bgevl.core.manifest import read_manifest

        self.family = family
        self.baseline = family.torch_baseline(checkpoint, threads)
        self.float_graphs = None
        if float_export is not None:
            manifest = read_manifest(float_export)
            self.float_graphs = (manifest.graph_specs(), {name: manifest.graph_path(name) for name in manifest.graphs})

    def case(self, key: str, workload: str, batch: int, count_flops: bool = True) -> Case:
        images, texts = raw_inputs(workload, batch)
        request = self.family.bench_request(split_workload(workload)[0], images, texts)
        case = Case(key, workload, batch, request, self.baseline.preprocessor.prepare(request))
        case.tokens = self.family.prompt_tokens(case.feeds)
        if count_flops and self.float_graphs is not None:
            from bgevl.benchmarks.flops import recipe_gflop

            case.gflop = recipe_gflop(self.family, *self.float_graphs, self.first_item_feeds(case), batch)
        if count_flops and case.gflop != case.gflop:  # no float export, or graphs too large to count in memory
            case.gflop = self.baseline.gflop(request, case.feeds)
        return case

    def first_item_feeds(self, case: Case) -> dict:
        """One item's feeds as the batch runs them: where every graph's first axis counts the items (declared:
        ``GraphSpec.batch_aligned`` and ``counts_items``), the first row of the batch's own feeds (texts padded
        to the batch's longest, so the count is of what the call computes: 8 texts of 9-61 tokens cost 8 x 61
        tokens, not 8 x 9); otherwise (an MLLM's image tiles, a screenshot's patches) the first item prepared
        alone."""
        specs = self.float_graphs[0] if self.float_graphs is not None else {}
        if specs and all(spec.batch_aligned and spec.counts_items for spec in specs.values()):
            return {k: v[:1] for k, v in case.feeds.items()}
        return self.baseline.preprocessor.prepare(case.request.slice(0, 1))

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


class PlainPytorch:
    """The PyTorch baseline in a child process whose glibc malloc is left as it is (the benchmark process
    tunes its own: ``bgevl.benchmarks.measure.tune_allocator``); each call is timed in the child
    (``SelfTimed``), so the pipe's round trip is not counted."""

    def __init__(self, family: Any, checkpoint: Path, threads: int):
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited mallopt
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_plain_worker, args=(child, family.name, str(checkpoint), threads),
                                       daemon=True)
        self.process.start()
        self._answer()

    def _answer(self) -> Any:
        from bgevl.core.errors import BgevlError

        status, value = self.connection.recv()
        if status != "ok":
            raise BgevlError(f"the plain PyTorch baseline process failed: {value}")
        return value

    def call(self, key: str, workload: str, batch: int) -> Callable[[], Any]:
        from bgevl.benchmarks.measure import SelfTimed

        self.connection.send(("case", key, workload, batch))
        self._answer()

        def run() -> SelfTimed:
            self.connection.send(("run",))
            seconds, value = self._answer()
            return SelfTimed(seconds, value)

        return run

    def close(self) -> None:
        if self.process.is_alive():
            self.connection.send(("stop",))
            self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()


def _plain_worker(connection: Any, family_name: str, checkpoint: str, threads: int) -> None:
    import signal
    import time

    from bgevl.core.registry import get_family

    # Ctrl-C reaches the whole process group: the parent handles it and stops this process (close(), or the
    # pipe's end), so it prints nothing of its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        model = BenchModel(get_family(family_name), Path(checkpoint), threads)
        connection.send(("ok", None))
        call: Callable[[], Any] | None = None
        while True:
            message = connection.recv()
            if message[0] == "stop":
                return
            if message[0] == "case":
                _, key, workload, batch = message
                call = model.torch_call(model.case(key, workload, batch, count_flops=False))
                connection.send(("ok", None))
            else:
                assert call is not None  # a "case" message comes first
                t0 = time.perf_counter()
                value = call()
                connection.send(("ok", (time.perf_counter() - t0, np.asarray(value, np.float32))))
    except (EOFError, BrokenPipeError):  # the parent went away (interrupted): end quietly
        return
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        connection.send(("error", f"{type(exc).__name__}: {exc}"))
