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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from bgevl.core.errors import InputError
from bgevl.core.specs import GraphSpec

if TYPE_CHECKING:  # pragma: no cover
    from bgevl.core.family import Call
    from bgevl.core.manifest import Manifest

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

    def close(self) -> None:
        """Free what the backend holds (a session, a compiled model, device memory); the runner is unusable
        after. Default: drop the references and let the backend's objects go. Idempotent."""

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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


def close_runners(runners: Mapping[str, Any]) -> None:
    """``close()`` every runner of a set (each once, whatever fails)."""
    for runner in runners.values():
        close = getattr(runner, "close", None)
        if close is not None:
            close()


def runner_call(runners: Mapping[str, Runner]) -> Callable[["Call"], dict[str, np.ndarray]]:
    """A recipe's graph calls on these runners."""
    return lambda call: runners[call.graph].run(dict(call.feed), call.outputs)


class OnnxRunner(Runner):
    """An ONNX Runtime session of one graph file."""

    def __init__(self, spec: GraphSpec, path: Any, providers: list | None = None, threads: int | None = None):
        from bgevl.runtime.providers import create_session

        self.spec = spec
        self.session: Any = create_session(path, providers, threads)
        self.max_batch = spec.batch.max

    def close(self) -> None:
        self.session = None  # ONNX Runtime frees the session's memory when its last reference goes

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


@dataclass(frozen=True)
class BackendOptions:
    """What a backend may need to open an export's graphs (each backend reads the fields it uses)."""

    provider: str = "auto"  # ONNX Runtime execution provider ("auto", "cpu", "cuda", "tensorrt")
    threads: int | None = None
    provider_options: Any = None
    engine_cache_dir: Any = None
    openvino_precision: str = "bf16"


#: A backend: (manifest, graph names, options) -> {graph name: runner}.
BackendOpener = Callable[["Manifest", list[str], BackendOptions], dict[str, "Runner"]]

#: Backends register through this entry-point group (``pyproject.toml``), like model families: the
#: registry is read from package metadata, so this module imports none of them (no import circle) and
#: a backend in another installed package needs no change here.
BACKEND_ENTRY_POINT_GROUP = "bgevl.backends"


def _backend_entry_points() -> dict[str, Any]:
    from importlib.metadata import entry_points

    found: dict[str, Any] = {}
    for entry in entry_points(group=BACKEND_ENTRY_POINT_GROUP):
        found.setdefault(entry.name, entry)
    return dict(sorted(found.items(), key=lambda item: item[0] != "onnxruntime"))  # the default first


_BACKEND_ENTRIES = _backend_entry_points()
#: The registered backend names (``--backend`` choices).
BACKENDS = tuple(_BACKEND_ENTRIES)


def backend_opener(backend: str) -> BackendOpener:
    """The opener registered as ``backend``; an unknown name is one line listing the known ones."""
    try:
        entry = _BACKEND_ENTRIES[backend]
    except KeyError:
        raise InputError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}") from None
    return entry.load()


def open_runners(manifest: "Manifest", names: Sequence[str] | None = None, backend: str = "onnxruntime",
                 provider: str = "auto", threads: int | None = None, provider_options: Any = None,
                 engine_cache_dir: Any = None, openvino_precision: str = "bf16") -> dict[str, Runner]:
    """The graphs ``names`` (default: all) of an export on a registered backend: ONNX Runtime (with
    ``provider``), TensorRT engines, or OpenVINO at ``openvino_precision`` (checked against the export's
    probe set: ``bgevl.runtime.openvino``)."""
    options = BackendOptions(provider, threads, provider_options, engine_cache_dir, openvino_precision)
    return backend_opener(backend)(manifest, list(names or manifest.graphs), options)


def open_onnxruntime(manifest: "Manifest", names: list[str], options: BackendOptions) -> dict[str, Runner]:
    """The ``onnxruntime`` backend: one session per graph on the selected execution providers."""
    from bgevl.runtime.providers import provider_options_for, select_providers

    providers = provider_options_for(select_providers(options.provider), manifest.directory,
                                     precision=manifest.precision, engine_cache_dir=options.engine_cache_dir,
                                     overrides=options.provider_options)
    return {name: OnnxRunner(manifest.graph_spec(name), manifest.graph_path(name), providers, options.threads)
            for name in names}
