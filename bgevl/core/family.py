"""The model-family protocol: everything the generic parts of bgevl need to know about a family.

A family (CLIP dual encoders, LLaVA-NeXT embedders, ...) is one :class:`Family` object registered
in ``bgevl.families``. The exporter (``bgevl.export.driver``), the runtime (``bgevl.runtime``),
validation, the TensorRT build, the Triton repository and the benchmarks call only the methods
below and never ask which family they hold, the way Optimum's exporter runs one ``OnnxConfig``
per architecture through one ``export`` / ``validate_model_outputs``.

Two shared vocabularies:

* a :class:`Request` says *what* to embed (images and/or texts paired item by item, a role and a
  task instruction); the family's preprocessor turns it into **feeds** (named arrays);
* the family's **recipe** (:meth:`Family.steps`) says *how* feeds become embeddings: which graphs
  run in which order and how their outputs combine. It is a generator yielding lists of
  :class:`Call` (graphs that may run concurrently) and receiving their outputs, so one recipe
  drives ONNX Runtime or TensorRT runners (:func:`run_steps`), validation, the benchmarks and the
  Triton entry model's asynchronous BLS calls (:func:`run_steps_async`) alike.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, ClassVar, Generator, Mapping, Protocol, Sequence

import numpy as np
from numpy.typing import NDArray

from bgevl.core.specs import Dim, GraphSpec, ModelSpec, TensorSpec

if TYPE_CHECKING:  # pragma: no cover  (types only: these modules are not imported at run time)
    import argparse

    import onnx
    import torch

    from bgevl.core.manifest import Manifest
    from bgevl.core.options import ExportOptions
    from bgevl.core.preprocessing import InputLimits
    from bgevl.core.probes import ProbeSet

Feeds = dict[str, NDArray[Any]]

class Kind(StrEnum):
    """The kinds of item a family embeds: an image, a text, or both as one composed query. Their values are the
    names validation figures, benchmark workloads, corpus folders and metrics use (a ``str``: ``Kind.IMAGE ==
    "image"``)."""

    IMAGE = "image"
    TEXT = "text"
    COMPOSED = "composed"

    @classmethod
    def of(cls, has_image: bool, has_text: bool) -> "Kind":
        """The kind of an item with or without an image and a text (one of them at least)."""
        return cls.COMPOSED if has_image and has_text else cls.IMAGE if has_image else cls.TEXT

    @property
    def has_image(self) -> bool:
        return self is not Kind.TEXT

    @property
    def has_text(self) -> bool:
        return self is not Kind.IMAGE


IMAGE, TEXT, COMPOSED = Kind.IMAGE, Kind.TEXT, Kind.COMPOSED
KINDS = tuple(Kind)


#: Roles of a retrieval request (BGE-VL-MLLM's ``q_or_c``); families without roles accept and ignore them.
QUERY, CANDIDATE = "query", "candidate"
ROLES = {"q": QUERY, "query": QUERY, "c": CANDIDATE, "candidate": CANDIDATE}


def normalize_role(role: str) -> str:
    from bgevl.core.errors import InputError

    try:
        return ROLES[role]
    except (KeyError, TypeError):
        raise InputError(f"role {role!r}: use 'query' (or 'q') or 'candidate' (or 'c')", field="role") from None


@dataclass
class Request:
    """What to embed: ``images`` and ``texts`` pair up item by item (either may be absent, and in
    families that allow it an entry may be ``None``); ``role`` and ``instruction`` as the family
    defines them (families without them refuse an instruction). ``truncate``: what happens to a text
    whose item is over the model's token limit (``TRUNCATE_MODES``: ``NONE`` refuses it, ``END`` / ``START``
    cut tokens off its end / start until the item fits); ``None``: the preprocessor's default."""

    images: list[Any] | None = None
    texts: list[Any] | None = None
    role: str | None = None
    instruction: str | None = None
    truncate: str | None = None

    def __len__(self) -> int:
        return len(self.images if self.images is not None else self.texts or [])

    def kinds(self) -> list[Kind]:
        """The kind of each item: image-only, text-only or composed."""
        return [Kind.of(self.images is not None and self.images[i] is not None,
                        self.texts is not None and self.texts[i] is not None) for i in range(len(self))]

    def slice(self, start: int, stop: int) -> "Request":
        return replace(self, images=self.images[start:stop] if self.images is not None else None,
                       texts=self.texts[start:stop] if self.texts is not None else None)


@dataclass(frozen=True)
class Call:
    """One graph run inside a recipe: ``graph`` on ``feed``, returning ``outputs``."""

    graph: str
    feed: Mapping[str, NDArray[Any]]
    outputs: tuple[str, ...]


#: A recipe: yields lists of calls, receives a list of {output name: array} per call, returns the embeddings.
Steps = Generator[list[Call], list[dict[str, NDArray[Any]]], NDArray[Any]]


def run_steps(steps: Steps, run: Callable[[Call], dict[str, NDArray[Any]]]) -> NDArray[Any]:
    """Drive a recipe with a synchronous graph runner."""
    try:
        calls = next(steps)
        while True:
            calls = steps.send([run(call) for call in calls])
    except StopIteration as done:
        embeddings: NDArray[Any] = done.value
        return embeddings


async def run_steps_async(steps: Steps, run: Callable[[Call], Awaitable[dict[str, NDArray[Any]]]]) -> NDArray[Any]:
    """Drive a recipe with an asynchronous graph runner (the calls of one step run concurrently)."""
    import asyncio

    try:
        calls = next(steps)
        while True:
            calls = steps.send(list(await asyncio.gather(*(run(call) for call in calls))))
    except StopIteration as done:
        embeddings: NDArray[Any] = done.value
        return embeddings


class Preprocessor(ABC):
    """A family's preprocessing: a :class:`Request` -> the feeds of its recipe, with its input rules.
    Shared by the runtime, the export's validation, the benchmarks and the Triton preprocess model."""

    limits: "InputLimits"
    #: the model's tokenizer (a transformers fast tokenizer): ``truncate`` cuts texts at its token offsets
    tokenizer: Any = None
    #: what the model resizes an image to (an int: the short side; a pair: width and height; None: the
    #: image's own size), for the reduced-scale decode of very large JPEGs (``load_image``'s ``model_size``)
    image_model_size: int | tuple[int, int] | None = None

    def decode_image(self, item: Any, index: int = 0) -> Any:
        """One image decoded as :meth:`prepare` decodes it (limits checked on the header first, RGB
        conversion left to :meth:`prepare`), so callers can decode ahead, e.g. in a pool of threads
        (``bgevl.corpus``), and pass the PIL image: the feeds are the same as from the encoded bytes."""
        from bgevl.core.preprocessing import load_image

        return load_image(item, index, convert_rgb=False, limits=self.limits, model_size=self.image_model_size)

    @abstractmethod
    def prepare(self, request: Request, start: int = 0, *, serving: bool = False) -> Feeds:
        """Feeds for one batch of items. ``start``: index of its first item in the caller's list (errors
        name items by it). ``serving``: fixed shapes where the Triton preprocess model needs them."""

    def check(self, request: Request) -> Request:
        """Check a whole request before any item is decoded (roles, instruction, text limits); returns it
        with the family's defaults filled in."""
        return request

    def text_lengths(self, request: Request, start: int = 0) -> list[tuple[int, int] | None] | None:
        """Each item's tokens as the model counts them against its limit (prompt, instruction and image tokens
        included) and that limit, ``None`` for an item without text; ``None`` where the family cannot tell (then
        ``truncate`` is refused). Used by :meth:`admit` for ``Request.truncate``."""
        return None

    def admit(self, request: Request, start: int = 0) -> Request:
        """:meth:`check`, then the request's ``truncate`` applied (``bgevl.core.truncation``): over-long texts cut
        by ``END`` or ``START``, or refused by ``NONE``. A request without ``truncate`` keeps the preprocessor's own
        handling of over-long texts (a dual encoder's ``text_overflow``)."""
        from bgevl.core.errors import InputError
        from bgevl.core.truncation import check_mode, truncate_texts

        request = self.check(request)
        if request.truncate is None:
            return request
        mode = check_mode(request.truncate)
        request = replace(request, truncate=mode)
        if request.texts is None:
            return request
        tokenizer = self.tokenizer

        def lengths(texts: list[Any]) -> list[tuple[int, int] | None]:
            measured = self.text_lengths(replace(request, texts=texts), start)
            if measured is None or tokenizer is None:
                raise InputError("truncate: this model's preprocessor does not count its items' tokens; send "
                                 "truncate NONE and shorter texts", field="truncate")
            return measured

        return replace(request, texts=truncate_texts(request.texts, mode, lengths, tokenizer, start))

    #: the most tokens one batch may hold, padding included (items x the longest item), for families whose
    #: items cost a varying number of tokens (an image of any size); ``None``: batches by item count only
    token_budget: int | None = None

    def item_costs(self, request: Request, start: int = 0) -> list[int] | None:
        """Each item's tokens, estimated before it is decoded (from an image's header), for batching by
        :attr:`token_budget`; ``None`` where every item costs alike."""
        return None


def over_budget(items: int, longest: int, cost: int, budget: int | None) -> bool:
    """Whether a batch of ``items`` items whose longest costs ``longest`` tokens goes over ``budget`` when one more
    item of ``cost`` tokens joins it (every item padded to the longest)."""
    return budget is not None and (items + 1) * max(longest, cost) > budget


def batch_spans(n: int, max_items: int, costs: Sequence[int] | None = None, budget: int | None = None) -> list[tuple[int, int]]:
    """(start, stop) of each batch of ``n`` items in order: at most ``max_items`` items, and with ``costs`` and
    ``budget``, at most ``budget`` tokens once padded to the batch's longest item (an item over the budget alone
    goes alone)."""
    spans, start = [], 0
    while start < n:
        stop, longest = start + 1, costs[start] if costs is not None else 0
        while stop < n and stop - start < max_items:
            if costs is not None and over_budget(stop - start, longest, costs[stop], budget):
                break
            longest = max(longest, costs[stop]) if costs is not None else 0
            stop += 1
        spans.append((start, stop))
        start = stop
    return spans


class Original(ABC):
    """The independent fp32 reference of a family (``bgevl.reference``): the original code's computation."""

    DESCRIPTION: ClassVar[str]

    @abstractmethod
    def embed(self, request: Request) -> NDArray[Any]:
        """The original's L2-normalized fp32 embeddings of a request, in item order."""

    @abstractmethod
    def probe_embeddings(self, probes: "ProbeSet") -> dict[str, NDArray[Any]]:
        """Embeddings of the probe set by kind (the sanity gate of ``bgevl-export check``)."""


@dataclass(frozen=True)
class CheckpointKind:
    """What a checkpoint of one model family holds, as the hub repositories publish it."""

    model_type: str  # config.json "model_type"
    architecture: str  # for messages
    config_class: str  # transformers config class that parses config.json
    tokenizer_files: tuple[tuple[str, ...], ...]  # one of these file sets must be present
    #: config attributes (dotted) that tell the models of the family apart; compared with the
    #: --model spec's architecture so that a large checkpoint is not exported as base
    identity: tuple[str, ...]


@dataclass
class ExportedModel:
    """What the export driver holds of a loaded checkpoint: the model, its processor, the graphs to
    export and the manifest's description of the model."""

    model: "torch.nn.Module"
    processor: Any  # the checkpoint's transformers processor (or the family's own tokenizer/transform pair)
    graphs: dict[str, GraphSpec]
    preprocessor: Preprocessor
    embedding_dim: int
    max_text_length: int
    parameters: int
    #: the manifest's ``recipe`` section: the settings the family's runtime needs back (fusion formula,
    #: image layout, default instruction, ...)
    recipe: dict[str, Any] = field(default_factory=dict)
    #: extra fields of the manifest's ``model`` section
    details: dict[str, Any] = field(default_factory=dict)
    #: one line describing the loaded model, for the progress log
    summary: str = ""


#: The int8 passes of the graph services (``bgevl.graphs.precision``) a family's forms are written by.
INT8_METHODS = ("static-qdq", "static-qdq-u8", "dynamic", "weight-only-qdq", "weight-only-dynamic")


@dataclass(frozen=True)
class Int8Form:
    """One int8 form a family declares (``GraphExport.int8_forms``): the ``--int8-mode`` that selects it,
    what the manifest records per graph and what TensorRT builds, and the graph pass that writes it."""

    #: "static-qdq", "weight-only-qdq" (the forms TensorRT builds: ``bgevl.graphs.engines.precision_plan``),
    #: "dynamic", "weight-only-dynamic" (ONNX Runtime CPU only)
    name: str
    description: str
    calibrated: bool
    #: the ``--int8-mode`` value that selects it
    mode: str = "qdq"
    #: the pass that writes it (one of :data:`INT8_METHODS`; default: ``name``)
    method: str = ""

    def __post_init__(self) -> None:
        if (self.method or self.name) not in INT8_METHODS:
            raise ValueError(f"int8 form {self.name!r}: method {self.method or self.name!r} is none of {INT8_METHODS}")

    @property
    def pass_name(self) -> str:
        return self.method or self.name


class CheckpointSource(ABC):
    """Role: where the weights come from (the hub, a ``--model-path``, an offline generated checkpoint) and
    how they are checked and loaded; also the family's independent fp32 reference. Families whose checkpoints
    are in the hub's transformers layout subclass ``bgevl.checkpoints.HubCheckpoints``, which implements
    ``local_checkpoint``, ``download`` and ``check_files``."""

    checkpoint_kind: ClassVar[CheckpointKind]

    @abstractmethod
    def generate_checkpoint(self, spec: ModelSpec, directory: Path) -> Path:
        """Write a random-weight checkpoint of ``spec.architecture`` in the hub's layout (offline)."""

    @abstractmethod
    def local_checkpoint(self, path: Path) -> Path:
        """The checkpoint a ``--model-path`` names, refused in one line when it is not one."""

    @abstractmethod
    def download(self, spec: ModelSpec) -> Path:
        """The checkpoint of a hub model: the local Hugging Face cache, else a download (one-line error
        naming ``--model-path`` when neither works)."""

    @abstractmethod
    def check_files(self, path: Path, spec: ModelSpec, report: Callable[[str], None]) -> None:
        """``bgevl-export check`` before the reference runs: the files, a checked load, the tokenizer;
        one report line each."""

    @abstractmethod
    def load(self, path: Path, spec: ModelSpec | None = None,
             attn_implementation: str = "eager") -> tuple["torch.nn.Module", Any]:
        """The checked float32 (model, processor) of a checkpoint directory."""

    @abstractmethod
    def original(self, path: Path, recipe: Mapping[str, Any] | None = None) -> Original:
        """The independent fp32 reference on a checkpoint directory. ``recipe``: the export's (its manifest's
        ``recipe`` section), for families whose declarations a user may change at export (prompts, pixel
        bounds): the reference then computes with the same ones; ``None``: the family's defaults."""


class GraphExport(ABC):
    """Role: what is exported, in the spirit of Optimum's per-architecture ``OnnxConfig``: the graphs and
    the torch modules behind them, example and validation inputs, and the family's fp16/int8/fp8 forms."""

    #: (opt, max) batch of the exported graphs when the command line gives none
    default_batch: ClassVar[tuple[int, int]]
    #: whether ``--precision fp8`` applies: FP8 E4M3 Q/DQ on the weight GEMMs from a calibration set
    #: (``bgevl.graphs.precision`` with ``calibration_feeds``), for TensorRT on GPUs of compute capability 8.9+
    supports_fp8: ClassVar[bool] = False
    #: dynamic axes (beyond batch and sequence) whose TensorRT profile maximum ``bgevl-export build-engines``
    #: may override: axis name -> what it counts; each becomes an option ``--max-<axis>``
    profile_axes: ClassVar[Mapping[str, str]] = {}

    def add_export_arguments(self, group: "argparse._ArgumentGroup") -> None:
        """The family's own ``bgevl-export`` options, in an argument group the command line adds for it;
        their values reach :meth:`check_export_options` and :meth:`prepare_export` as
        ``options.family_options`` (by ``dest``). Default: none."""

    def check_export_options(self, spec: ModelSpec, options: "ExportOptions") -> None:
        """Refuse export options that do not apply to this family (before anything is loaded)."""

    @abstractmethod
    def prepare_export(self, path: Path, spec: ModelSpec, options: "ExportOptions") -> ExportedModel:
        """Load the checkpoint and declare its graphs (batch and sequence ranges from ``options``)."""

    @abstractmethod
    def graph_modules(self, exported: ExportedModel) -> dict[str, "torch.nn.Module"]:
        """The torch modules that define the graphs."""

    def example_feeds(self, graphs: Mapping[str, GraphSpec], modules: Mapping[str, "torch.nn.Module"],
                      requests: Sequence[Feeds]) -> dict[str, Feeds]:
        """An example feed per graph (batch >= 2 where possible) for tracing, from prepared requests.

        Default, derived from the declaration: for each graph, the first request that holds all of its
        inputs, cut to two items. Families whose graphs feed one another (a vision graph's output as a
        language graph's input) override it."""
        out: dict[str, Feeds] = {}
        for name, graph in graphs.items():
            feeds = next((f for f in requests if all(n in f for n in graph.input_names)), None)
            if feeds is None:
                raise ValueError(f"no validation request holds the inputs of graph {name!r} ({', '.join(graph.input_names)})")
            out[name] = {n: feeds[n][:2] for n in graph.input_names}
        return out

    @abstractmethod
    def validation_requests(self, probes: "ProbeSet") -> list[Request]:
        """The probe set as requests covering the family's item kinds."""

    def probe_description(self, exported: ExportedModel) -> dict[str, Any]:
        """Extra facts about how the probes were preprocessed, for the manifest."""
        return {}

    #: the family's int8 forms, one per ``--int8-mode`` it takes; the graph services write them
    #: (``bgevl.graphs.precision``), with the float32 islands of :meth:`fp16_keep_float32` and, for calibrated
    #: forms, the feeds of :meth:`calibration_feeds`
    int8_forms: ClassVar[tuple[Int8Form, ...]] = ()
    #: why a mode the family does not declare is refused, when there is more to say than its list of modes
    int8_refusal: ClassVar[str] = ""

    def int8_form(self, mode: str) -> Int8Form:
        """The int8 form of ``--int8-mode`` for this family; a mode it does not declare is one line naming its own."""
        from bgevl.core.errors import BgevlError

        for form in self.int8_forms:
            if form.mode == mode:
                return form
        modes = ", ".join(f.mode for f in self.int8_forms)
        raise BgevlError(f"--int8-mode {mode}: " + (self.int8_refusal or f"the {getattr(self, 'name', type(self).__name__)} "
                                                    f"family's int8 forms are {modes or 'none'}; use one of them"))

    def fp16_keep_float32(self, graph: GraphSpec, model: "onnx.ModelProto") -> dict[str, list[str]]:
        """Nodes of the fp32 ONNX ``model`` the fp16 pass keeps in float32 beyond the generic ones
        (``bgevl.graphs.onnx_passes.fp16_graph``), by what they are (for the manifest)."""
        return {}

    def calibration_feeds(self, preprocessor: Preprocessor, graph: GraphSpec, images: list[Any], texts: list[Any],
                          batch: int) -> list[Feeds]:
        """Calibration batches of one graph (families with calibrated int8 forms)."""
        raise NotImplementedError(f"{type(self).__name__} has no calibrated int8 form")


class Recipe(ABC):
    """Role: how a request becomes embeddings at run time: the preprocessor of an export and the steps
    (graph calls) that turn its feeds into L2-normalized embeddings."""

    #: the item kinds the family embeds (of IMAGE, TEXT, COMPOSED): validation, benchmarks and the API
    #: cover these; a model without composed queries declares (IMAGE, TEXT)
    kinds: ClassVar[tuple[str, ...]] = KINDS
    #: whether a query embeds differently from a candidate (a role and a task instruction change the
    #: embedding); where not, a role is accepted and ignored, an instruction refused, and a retrieval
    #: evaluation embeds each item once for both sides (``bgevl.quality``)
    roles_matter: ClassVar[bool] = False

    @abstractmethod
    def steps(self, feeds: Feeds, graphs: Mapping[str, GraphSpec]) -> Steps:
        """The recipe: which graphs run on ``feeds`` and how their outputs combine into L2-normalized embeddings."""

    @abstractmethod
    def open_preprocessor(self, processor_dir: Path, recipe: Mapping[str, Any], max_text_length: int,
                          limits: "InputLimits", **options: Any) -> Preprocessor:
        """The runtime's preprocessor from an export's processor files and manifest ``recipe`` section.
        Unknown ``options`` are a TypeError naming them."""

    def prompt_tokens(self, feeds: Feeds) -> int:
        """The tokens one batch's feeds hold, for the embeddings API's ``usage``: the ones of the attention
        mask (the text tokens, and the image tokens of families that put images into the sequence).
        Families whose images go to a separate vision tower add nothing for them by default."""
        mask = feeds.get("attention_mask")
        return int(np.asarray(mask).sum()) if mask is not None else 0

    def default_instruction(self, recipe: Mapping[str, Any]) -> str | None:
        """The task instruction a query takes when none is given (families with instructions)."""
        return None


class BatchingConfig(Protocol):
    """A Triton model's batching and instances, as :meth:`TritonModels.batching` makes it (opaque to families:
    they pass it back to the writer and to ``bgevl.serving.configs``, which read these fields)."""

    @property
    def max_batch(self) -> int: ...
    @property
    def preferred(self) -> tuple[int, ...]: ...
    @property
    def max_queue_delay_us(self) -> int: ...
    @property
    def instances(self) -> int: ...
    @property
    def kind(self) -> str: ...


class TritonModels(Protocol):
    """The Triton repository writer's API that :meth:`ServingLayout.write_triton_models` uses
    (``bgevl.serving.repository.RepositoryWriter`` implements it). The writer knows the export
    (``manifest``), names the models (``<name>_<part>``) and writes the generic ones; a family adds its own
    with ``bgevl.serving.configs`` and :meth:`write`."""

    manifest: "Manifest"
    preprocess_instances: int
    #: the configs written so far, by model name (for ``bgevl.serving.configs.check_ensemble_wiring``)
    configs: dict[str, object]

    def model_name(self, part: str) -> str:
        """``<name>_<part>``: the name of one of the repository's models."""

    def batching(self, dim: Dim | int, kind: str = "KIND_CPU", instances: int | None = None) -> BatchingConfig:
        """Batching over a graph's batch axis (or a fixed max batch) with the repository's instances and queue delay."""

    def write(self, config: Any, module: str | None = None) -> Path:
        """Write a model's ``config.pbtxt`` and, with ``module``, the python-backend shim importing it; its version folder."""

    def right_padded(self) -> bool:
        """Whether the export's tokenizer pads on the right."""

    def encoder(self, graph_name: str, trim_right_padding: str | None = None) -> str:
        """The encoder model of one graph on the repository's backend (``trim_right_padding``: the mask input
        whose common right padding a merged batch may cut); its name."""

    def preprocess(self, inputs: list[TensorSpec], outputs: list[TensorSpec], batching: BatchingConfig,
                   options: dict[str, Any] | None = None) -> str:
        """``<name>_preprocess``: the family's preprocessor (``Recipe.open_preprocessor``) on the serving inputs."""

    def entry(self, batching: BatchingConfig, graph_models: dict[str, str], preprocess: str) -> str:
        """The entry model ``<name>``: the family's recipe over the encoders, by BLS."""


class ServingLayout(ABC):
    """Role: the family's models of a Triton repository and the entry model's inputs."""

    #: the entry model's inputs (of SERVING_IMAGE, SERVING_TEXT, SERVING_INSTRUCTION, SERVING_ROLE)
    serving_inputs: ClassVar[tuple[str, ...]]

    @abstractmethod
    def write_triton_models(self, writer: TritonModels) -> None:
        """The family's models of a Triton repository, written through the writer's API (:class:`TritonModels`)."""

    @abstractmethod
    def preprocess_outputs(self, present: set[str]) -> list[str]:
        """The preprocess model's outputs a request with the serving inputs ``present`` produces."""

    def serving_preprocess_inputs(self, inputs: dict[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
        """The entry model's inputs (BYTES ``[batch, 1]``) in the shapes of the family's preprocess model."""
        return inputs


class BenchBaseline(ABC):
    """Role: what ``bgevl-bench`` measures the exports against (the PyTorch model a user would otherwise
    run) and the requests of its workloads."""

    #: whether ``bgevl-bench`` exports with a max batch grown to its largest batch size (cheap towers),
    #: or keeps the family default and skips larger batches (7B prefills)
    bench_grows_max_batch: ClassVar[bool] = True

    @abstractmethod
    def bench_request(self, workload: str, images: list[Any] | None, texts: list[Any] | None) -> Request:
        """The request of a benchmark workload (one of the family's ``kinds``) on the given inputs."""

    def serving_workloads(self, images: list[Any], texts: list[Any]) -> dict[str, Request]:
        """The perf_analyzer input files shipped with a repository: file stem -> request."""
        kinds = getattr(self, "kinds", KINDS)
        return {kind: self.bench_request(kind, images if kind != TEXT else None, texts if kind != IMAGE else None)
                for kind in kinds}

    @abstractmethod
    def torch_baseline(self, checkpoint: Path, threads: int) -> "TorchBaseline":
        """The PyTorch model a user would otherwise run."""


class TorchBaseline(Protocol):
    """What :meth:`BenchBaseline.torch_baseline` returns."""

    @property
    def preprocessor(self) -> Preprocessor:
        """The preprocessor whose feeds :meth:`call` and :meth:`gflop` take (a family's own subclass may be held)."""

    def call(self, request: Request, feeds: Feeds) -> Callable[[], NDArray[Any]]:
        """A callable that embeds the prepared request (what the benchmark times)."""

    def gflop(self, request: Request, feeds: Feeds) -> float:
        """The request's GFLOP (for the share of the CPU's peak)."""


class Family(CheckpointSource, GraphExport, Recipe, ServingLayout, BenchBaseline):
    """One model family: a name, its ``--model`` keys and the five roles above. Generic code takes the
    role it needs (the runtime a :class:`Recipe`, the repository writer a :class:`ServingLayout`, ...).

    Subclasses import their heavy dependencies (torch, transformers) inside the methods, so listing the
    families (the command line's ``--model`` choices) stays cheap. Two intermediate bases: the dual-encoder
    base ``bgevl.families.dual_encoder.DualEncoderFamily`` (image and text towers from their declarations,
    composed queries by score fusion where declared; CLIP subclasses it, and a real SigLIP is two hooks:
    ``tests/plugins/bgevl_siglip``) and the decoder-embedder base ``bgevl.families.decoder.DecoderEmbedderFamily``
    (the last token's hidden state of a multimodal LLM, task instructions on queries, weight-only int8, the Triton
    repository from the declared preprocess feeds; LLaVA-NeXT's ``MllmFamily`` with fixed anyres tiles and
    Qwen2.5-VL's ``ScreenshotFamily`` with images of any size subclass it)."""

    name: ClassVar[str]
    description: ClassVar[str]
    models: ClassVar[tuple[ModelSpec, ...]]
