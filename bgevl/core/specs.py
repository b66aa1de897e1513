"""The one place where BGE-VL models and their graphs are declared.

Every other part (exporter, runtime, Triton configs, benchmarks) derives input names,
dtypes, shapes and dynamic axes from the declarations here, the way Optimum's
``OnnxConfig`` drives its exporter.

Two kinds of declaration:

* :class:`ModelSpec`: a model the command line accepts (``--model tiny|base|large|...``): where its
  weights come from and, for offline random-weight builds, its architecture. Each model family
  declares its own (``bgevl.families.<family>``); ``bgevl.families.get_model_spec`` finds them.
* :class:`GraphSpec`: one ONNX graph (inputs, outputs, named dynamic axes with their
  min/opt/max ranges), built by the model family from a loaded model config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, cast

import numpy as np


#: ONNX opset of every exported graph. >= 17 so LayerNorm is exported as the
#: LayerNormalization op, which TensorRT maps to its normalization layer (FP16-safe).
ONNX_OPSET = 18

#: Default and max batch of the exported graphs' dynamic batch axis (TensorRT profiles,
#: Triton ``max_batch_size`` and benchmark sweeps read these).
DEFAULT_OPT_BATCH = 8
DEFAULT_MAX_BATCH = 64

PRECISIONS = ("fp32", "fp16", "int8", "fp8")

#: The name of the dynamic axis that counts a request's items
BATCH_AXIS = "batch"

#: Minimum cosine similarity to the PyTorch reference an export must reach, per precision.
#: Enforced on pretrained checkpoints; on random weights the figures are reported (see
#: ``bgevl.core.parity``).
#: fp8 (E4M3, 3 mantissa bits, on the weight GEMMs only) is held to int8's bound: NVIDIA reports CLIP ViT-L/14 FP8
#: retrieval "comparable" to FP16 with the patch embedding unquantized, as here.
COSINE_THRESHOLDS = {"fp32": 0.99999, "fp16": 0.999, "int8": 0.99, "fp8": 0.99}


@dataclass(frozen=True)
class Dim:
    """A dynamic axis: its name in the ONNX graph and the range the artifacts must serve."""

    name: str
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        # min 0: an axis that may be empty (Visualized-BGE's text graph takes 0 image tokens for texts)
        if not (0 <= self.min <= self.opt <= self.max) or self.max < 1:
            raise ValueError(f"dynamic axis {self.name!r}: need 0 <= min <= opt <= max and max >= 1, got {self}")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "int64"
    shape: tuple[int | Dim, ...]
    description: str = ""
    #: Inclusive range of the values an integer input may hold (token ids within the vocabulary, a
    #: mask's 0 and 1); ``None``: not declared. Checked by :meth:`GraphSpec.check_feed`.
    values: tuple[int, int] | None = None

    def symbolic_shape(self) -> list[int | str]:
        """Shape with dynamic axes written as their names (the manifest's form)."""
        return [d.name if isinstance(d, Dim) else d for d in self.shape]

    def dynamic_axes(self) -> dict[int, Dim]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, Dim)}

    def concrete_shape(self, which: str = "opt", **overrides: int) -> tuple[int, ...]:
        """A concrete shape: each dynamic axis at its ``min``/``opt``/``max`` or an override."""
        return tuple(
            overrides.get(d.name, getattr(d, which)) if isinstance(d, Dim) else d for d in self.shape
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": self.symbolic_shape(),
            "dynamic_axes": {str(i): asdict(d) for i, d in self.dynamic_axes().items()},
            "description": self.description,
            **({"values": list(self.values)} if self.values is not None else {}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TensorSpec":
        dyn = {int(i): Dim(**d) for i, d in data.get("dynamic_axes", {}).items()}
        shape = tuple(dyn[i] if i in dyn else int(s) for i, s in enumerate(data["shape"]))
        values = cast("tuple[int, int]", tuple(int(v) for v in data["values"])) if data.get("values") is not None else None
        return cls(data["name"], data["dtype"], shape, data.get("description", ""), values)


@dataclass(frozen=True)
class GraphSpec:
    """One exported graph: ``name`` is also its file stem (``vision.onnx``)."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    description: str = ""
    #: (normalized output, unnormalized output) when the graph ends in an L2 normalization: the
    #: exporter keeps the nodes between the two in float32 at every precision.
    normalized_output: tuple[str, str] | None = None
    #: whether the rows of the first axis are computed independently of each other, so that a feed may be
    #: split or merged along it; not so for a vision tower whose rows are one image's patches attending to
    #: each other (Qwen2.5-VL's): a runner must run such a feed whole
    splittable: bool = True

    @property
    def filename(self) -> str:
        return f"{self.name}.onnx"

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def check_feed(self, feed: Mapping[str, Any], *, batch_limit: bool = True) -> None:
        """Refuse, with one line naming the tensor (:class:`~bgevl.core.errors.InputError`), a feed this graph
        was not declared for: a missing or unknown input, another dtype or rank, a fixed axis of another
        size, a dynamic axis outside its range or of two sizes in one feed, integer values outside their
        declared range (token ids past the vocabulary, negative ids, a mask that is not 0/1).

        Every backend runs a graph through this one check (``bgevl.runtime.runners.Runner.run``, the
        Triton python-backend encoders), because the backends differ in what they catch themselves:
        ONNX Runtime's Gather takes negative ids as Python-style indices and OpenVINO's reads past the
        table, both answering a wrong embedding; an overlong sequence costs seconds of CPU before it
        fails, or does not fail at all. ``batch_limit=False`` skips the batch axis's maximum (callers
        that split a feed into chunks of it)."""
        from bgevl.core.errors import InputError

        unknown = sorted(set(feed) - set(self.input_names))
        missing = [name for name in self.input_names if name not in feed]
        if missing or unknown:
            raise InputError(f"graph {self.name!r}: " + "; ".join(
                ([f"missing input(s) {', '.join(missing)}"] if missing else [])
                + ([f"unknown input(s) {', '.join(unknown)}"] if unknown else []))
                + f" (it takes {', '.join(self.input_names)})")
        sizes: dict[str, tuple[int, str]] = {}
        batch = self.batch.name
        for tensor in self.inputs:
            value = feed[tensor.name]
            where = f"graph {self.name!r} input {tensor.name!r}"
            dtype = getattr(value, "dtype", None)
            if dtype is None or np.dtype(dtype) != np.dtype(tensor.dtype):
                raise InputError(f"{where}: dtype {dtype}, expected {tensor.dtype}")
            if value.ndim != len(tensor.shape):
                raise InputError(f"{where}: shape {list(value.shape)}, expected {tensor.symbolic_shape()}")
            for axis, (size, dim) in enumerate(zip(value.shape, tensor.shape)):
                if not isinstance(dim, Dim):
                    if size != dim:
                        raise InputError(f"{where}: axis {axis} is {size}, expected {dim}")
                    continue
                top = dim.max if batch_limit or dim.name != batch else size
                if not dim.min <= size <= top:
                    raise InputError(f"{where}: {dim.name} {size} is outside the served range {dim.min}..{dim.max}")
                seen = sizes.setdefault(dim.name, (size, tensor.name))
                if seen[0] != size:
                    raise InputError(f"{where}: {dim.name} {size} differs from {seen[1]!r}'s {seen[0]}")
            if np.issubdtype(value.dtype, np.floating) and value.size and not np.isfinite(value).all():
                bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
                raise InputError(f"{where}: {bad} non-finite value(s) (NaN or infinity); a model fed them answers NaN "
                                 f"embeddings: send finite values")
            if tensor.values is not None and value.size:
                low, high = int(value.min()), int(value.max())
                if low < tensor.values[0] or high > tensor.values[1]:
                    bad = low if low < tensor.values[0] else high
                    raise InputError(f"{where}: value {bad} is outside {tensor.values[0]}..{tensor.values[1]}")

    @property
    def batch(self) -> Dim:
        """The batch axis (the first axis of the first input)."""
        batch = self.inputs[0].shape[0]
        if not isinstance(batch, Dim):
            raise ValueError(f"graph {self.name!r}: the first axis of input {self.inputs[0].name!r} is fixed ({batch}), "
                             f"not a dynamic batch axis")
        return batch

    @property
    def batch_aligned(self) -> bool:
        """True when every input and output has the same first axis, so that a batch may be split
        or merged along it (runners chunk such graphs; Triton's dynamic batching owns the axis).
        Not so for the MLLM language graph: ``tile_features`` is indexed by tile, not by item."""
        first = {t.shape[0].name if isinstance(t.shape[0], Dim) else None for t in self.inputs + self.outputs}
        return self.splittable and len(first) == 1 and None not in first

    @property
    def counts_items(self) -> bool:
        """Whether the first axis counts the request's items (named :data:`BATCH_AXIS`), rather than tiles,
        image tokens or patches."""
        return self.batch.name == BATCH_AXIS

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "file": self.filename,
            "description": self.description,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "normalized_output": list(self.normalized_output) if self.normalized_output else None,
            **({} if self.splittable else {"splittable": False}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "GraphSpec":
        return cls(
            name=data["name"],
            inputs=tuple(TensorSpec.from_json(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_json(t) for t in data["outputs"]),
            description=data.get("description", ""),
            normalized_output=tuple(data["normalized_output"]) if data.get("normalized_output") else None,
            splittable=bool(data.get("splittable", True)),
        )


def items_per_step(graphs: Mapping[str, GraphSpec]) -> int:
    """How many items a recipe step takes at most: the smallest maximum of the graphs' item batch axes (the
    axes of tiles or image tokens count other things)."""
    item_graphs = [g for g in graphs.values() if g.counts_items] or list(graphs.values())
    return min(g.batch.max for g in item_graphs)


#: Default longest sequence a language graph serves (``--max-sequence-length``; MLLM: prompt + image
#: tokens; one 512x512 image is 2928 tokens on BGE-VL-MLLM: 576 base + 48x48 unpadded grid + 48 newlines).
DEFAULT_MAX_SEQUENCE = 4096

#: Input names every family's text and image graphs use (the tokenizer's and image processor's own names).
PIXEL_VALUES, INPUT_IDS, ATTENTION_MASK = "pixel_values", "input_ids", "attention_mask"
#: The values an attention mask holds.
MASK_VALUES = (0, 1)


@dataclass(frozen=True)
class TextPadding:
    """How a text tower's token ids are laid out: a fact of the model, which the runtime's preprocessor,
    the export's graph declaration and the Triton text encoder all follow.

    CLIP takes an attention mask and pools at the end-of-text token, so texts are padded to the batch's
    longest and a server may cut a merged batch's common right padding. SigLIP was trained on texts padded
    to a fixed 64 tokens without a mask and pools at the last position: padded any other way, or trimmed,
    its embeddings are silently wrong (transformers' ``SiglipModel`` docs: ``padding="max_length"``)."""

    #: pad every text to this many tokens (``None``: to the longest text of the batch)
    fixed_length: int | None = None
    #: whether the text graph takes an ``attention_mask`` input
    attention_mask: bool = True

    @property
    def input_names(self) -> tuple[str, ...]:
        """The text graph's inputs, in order."""
        return (INPUT_IDS, ATTENTION_MASK) if self.attention_mask else (INPUT_IDS,)

    @property
    def trimmable(self) -> bool:
        """Whether a batch's common right padding may be cut (masked, and not padded to a fixed length)."""
        return self.attention_mask and self.fixed_length is None


def token_ids(vocab_size: int | None) -> tuple[int, int] | None:
    """The values a token-id input may hold: ids of the model's embedding table (``None``: not declared)."""
    return (0, int(vocab_size) - 1) if vocab_size else None


def batch_dim(opt: int = DEFAULT_OPT_BATCH, max_batch: int = DEFAULT_MAX_BATCH) -> Dim:
    return Dim(BATCH_AXIS, 1, min(opt, max_batch), max_batch)


# ---------------------------------------------------------------------------------------
# Serving API (the Triton repository's entry model; clients and benchmarks use these names)
# ---------------------------------------------------------------------------------------

#: Inputs and output of the entry model ``<name>`` of a generated Triton repository. TEXT and
#: IMAGE are BYTES (UTF-8 text, encoded image files), each optional: send either or both.
#: INSTRUCTION and ROLE (BYTES [1], for families that take them) are the query task instruction
#: and ``query``/``candidate``.
SERVING_TEXT, SERVING_IMAGE, SERVING_INSTRUCTION, SERVING_ROLE = "TEXT", "IMAGE", "INSTRUCTION", "ROLE"
#: an optional input of every entry and preprocess model: ``Request.truncate`` (NONE, END, START), one per request
SERVING_TRUNCATE = "TRUNCATE"
SERVING_EMBEDDING = "EMBEDDING"
DEFAULT_SERVING_NAME = "bgevl"



@dataclass(frozen=True)
class ModelSpec:
    key: str
    family: str  # the name of its family in bgevl.families
    description: str
    hub_id: str | None = None
    #: transformers config kwargs of the architecture, for offline random-weight builds.
    architecture: Mapping[str, Any] = field(default_factory=dict)
    #: Parameters in billions (descriptive: messages and the model list).
    billions: float = 0.0
    #: Declared by the family for 7B-class models: an fp32 export is refused unless forced (the weights
    #: alone are 4 bytes per parameter, 30 GB for the 7B MLLM, and export holds about two copies in
    #: memory), and the benchmark measures fp16 as the float export instead.
    fp32_too_large: bool = False

    @property
    def generated(self) -> bool:
        """True for the embedded tiny models generated offline (no hub id)."""
        return self.hub_id is None


def graph_specs_to_json(specs: Mapping[str, GraphSpec]) -> dict[str, Any]:
    return {name: spec.to_json() for name, spec in specs.items()}

