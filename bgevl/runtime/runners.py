"""One runner interface over the backends that run an exported graph, with batching in one place.

A runner runs one graph (:class:`~bgevl.core.specs.GraphSpec`): ONNX Runtime sessions
(:class:`OnnxRunner`), TensorRT engines (``bgevl.runtime.tensorrt.TensorRTRunner``), OpenVINO on the
CPU (``bgevl.runtime.openvino.OpenVinoRunner``, bf16 where the CPU has it) and, for the
benchmark baseline, the torch modules the graphs were exported from (:class:`TorchModuleRunner`).
Each backend implements only :meth:`Runner.run_once`; :meth:`Runner.run` splits a feed into
chunks of the graph's max batch when its inputs and outputs share the batch axis
(``GraphSpec.batch_aligned``) and runs it whole otherwise, as Polygraphy's ``BaseRunner`` keeps
the backend-specific part small. A family's recipe (``bgevl.core.family.run_steps``) runs on a
``{graph: runner}`` mapping through :func:`runner_call`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from bgevl.core.errors import InputError
from bgevl.core.specs import GraphSpec

if TYPE_CHECKING:  # pragma: no cover
    from bgevl.core.family import Call
    from bgevl.core.manifest import Manifest

BACKENDS = ("onnxruntime", "tensorrt", "openvino")


class Runner(ABC):
    spec: GraphSpec
    max_batch: int

    @property
    @abstractmethod
    def providers(self) -> list[str]:
        """What runs the graph, for reports."""

    @abstractmethod
    def run_once(self, feed: Mapping[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        """One backend call on the whole feed."""

    def run(self, feed: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """``outputs`` by name; batch-aligned graphs in chunks of their max batch. The feed is checked
        against the graph's declaration first (``GraphSpec.check_feed``), whatever the backend."""
        outputs = list(outputs)
        self.spec.check_feed(feed, batch_limit=not self.spec.batch_aligned)
        n = len(next(iter(feed.values())))
        if not self.spec.batch_aligned or n <= self.max_batch:
            return dict(zip(outputs, self.run_once(feed, outputs)))
        parts = [self.run_once({k: v[s:s + self.max_batch] for k, v in feed.items()}, outputs)
                 for s in range(0, n, self.max_batch)]
        return {name: np.concatenate(chunks) for name, chunks in zip(outputs, zip(*parts))}


def runner_call(runners: Mapping[str, Runner]) -> Callable[["Call"], dict[str, np.ndarray]]:
    """A recipe's graph calls on these runners."""
    return lambda call: runners[call.graph].run(dict(call.feed), call.outputs)


class OnnxRunner(Runner):
    """An ONNX Runtime session of one graph file."""

    def __init__(self, spec: GraphSpec, path: Any, providers: list | None = None, threads: int | None = None):
        from bgevl.runtime.providers import create_session

        self.spec = spec
        self.session = create_session(path, providers, threads)
        self.max_batch = spec.batch.max

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def run_once(self, feed: Mapping[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        return self.session.run(list(outputs), dict(feed))


class TorchModuleRunner(Runner):
    """The torch module a graph was exported from (positional inputs and outputs in the spec's order)."""

    def __init__(self, spec: GraphSpec, module: Any):
        self.spec, self.module, self.max_batch = spec, module, spec.batch.max

    @property
    def providers(self) -> list[str]:
        return ["torch eager"]

    def run_once(self, feed: Mapping[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        import torch

        with torch.inference_mode():
            result = self.module(*(torch.from_numpy(np.asarray(feed[name])) for name in self.spec.input_names))
        result = result if isinstance(result, (tuple, list)) else (result,)
        by_name = dict(zip(self.spec.output_names, result))
        return [by_name[name].numpy() for name in outputs]


def open_runners(manifest: "Manifest", names: Sequence[str] | None = None, backend: str = "onnxruntime",
                 provider: str = "auto", threads: int | None = None, provider_options: Any = None,
                 engine_cache_dir: Any = None, openvino_precision: str = "bf16") -> dict[str, Runner]:
    """The graphs ``names`` (default: all) of an export on ONNX Runtime (with ``provider``), as TensorRT
    engines, or compiled by OpenVINO at ``openvino_precision`` (checked against the export's probe set:
    ``bgevl.runtime.openvino``)."""
    from bgevl.runtime.providers import provider_options_for, select_providers

    names = list(names or manifest.graphs)
    if backend == "openvino":
        from bgevl.runtime.openvino import open_openvino

        return open_openvino(manifest, names, openvino_precision, threads)
    if backend == "tensorrt":
        from bgevl.runtime.tensorrt import TensorRTRunner

        return {name: TensorRTRunner.from_manifest(manifest, name) for name in names}
    if backend != "onnxruntime":
        raise InputError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    providers = provider_options_for(select_providers(provider), manifest.directory, precision=manifest.precision,
                                     engine_cache_dir=engine_cache_dir, overrides=provider_options)
    return {name: OnnxRunner(manifest.graph_spec(name), manifest.graph_path(name), providers, threads) for name in names}
