"""Triton ``config.pbtxt`` files, built as ``ModelConfig`` protobuf messages from the graph declarations.

Built with Triton's own schema (``tritonclient.grpc.model_config_pb2``) and written with
``google.protobuf.text_format``, so every file is valid ModelConfig text by construction; the
encoder configs derive names, dtypes, dims and batch ranges from the export's ``manifest.json``
(which the exporter wrote from ``bgevl.core.specs``), not from a second list.

Encoder backends:

* ``onnxruntime``: ``platform: "onnxruntime_onnx"`` (a GPU/CPU Triton with the ORT backend);
* ``tensorrt``: ``platform: "tensorrt_plan"`` (engines from the TensorRT issue);
* ``python``: the python backend running ONNX Runtime, which the CPU-only server bundled in the
  ``nvidia-pytriton`` wheel can load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from bgevl.core.specs import Dim, GraphSpec, TensorSpec

if TYPE_CHECKING:
    from bgevl.core.family import BatchingConfig

#: How an exported graph is served: Triton's ONNX Runtime, TensorRT or OpenVINO backends (a full Triton), or
#: the python backend running ONNX Runtime ("python") or OpenVINO ("python-openvino"; the bundled CPU server).
ENCODER_BACKENDS = ("onnxruntime", "tensorrt", "openvino", "python", "python-openvino")

#: Parameters of the BLS entry model naming the models it calls (its preprocess model; graph name -> encoder
#: model, JSON): how ``bgevl-serve`` knows what the entry depends on (Triton knows an ensemble's steps only).
ENTRY_PREPROCESS, ENTRY_GRAPH_MODELS = "preprocess_model", "graph_models"
#: the entry's preprocess model of text-only requests (an instance of its own: a text never waits behind images)
ENTRY_PREPROCESS_TEXT = "preprocess_text_model"

#: numpy dtype name -> Triton data type (model_config.proto ``DataType``).
TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
                 "bool": "TYPE_BOOL", "bytes": "TYPE_STRING"}


def _pb():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("Triton packaging needs tritonclient: pip install 'bgevl-export[serving]'") from exc
    return model_config_pb2


@dataclass(frozen=True)
class Batching:
    """Dynamic batching and instances of one model (from the manifest's batch axis)."""

    max_batch: int
    preferred: tuple[int, ...]
    max_queue_delay_us: int = 2000
    instances: int = 1
    kind: str = "KIND_CPU"

    @classmethod
    def from_dim(cls, batch: Dim, instances: int = 1, kind: str = "KIND_CPU", delay_us: int = 2000,
                 preferred: tuple[int, ...] | None = None) -> "Batching":
        """``preferred``: the dynamic batcher's preferred sizes (default: the axis' opt and max)."""
        sizes = tuple(sorted({b for b in preferred if b <= batch.max})) if preferred else tuple(sorted({batch.opt, batch.max}))
        return cls(batch.max, sizes, delay_us, instances, kind)


def _tensor(msg, tensor: TensorSpec, *, batched: bool, optional: bool = False) -> None:
    msg.name = tensor.name
    msg.data_type = _pb().DataType.Value(TRITON_DTYPES[tensor.dtype])
    shape = tensor.shape[1:] if batched else tensor.shape
    msg.dims.extend(-1 if isinstance(d, Dim) else int(d) for d in shape)
    if optional:
        msg.optional = True


def _instances(config, batching: BatchingConfig) -> None:
    group = config.instance_group.add()
    group.count = batching.instances
    group.kind = _pb().ModelInstanceGroup.Kind.Value(batching.kind)


def _batching(config, batching: BatchingConfig) -> None:
    """``max_batch == 0``: full shapes, one request per execution, no dynamic batching."""
    config.max_batch_size = batching.max_batch
    if batching.max_batch > 0:
        config.dynamic_batching.preferred_batch_size.extend(p for p in batching.preferred if p <= batching.max_batch)
        config.dynamic_batching.max_queue_delay_microseconds = batching.max_queue_delay_us
    _instances(config, batching)


def encoder_config(name: str, graph: GraphSpec, backend: str, batching: BatchingConfig, *,
                   model_file: str | None = None, parameters: Mapping[str, str] | None = None):
    """Config of one exported graph served on its own (addressable directly)."""
    if backend not in ENCODER_BACKENDS:
        raise ValueError(f"encoder backend {backend!r}: choose one of {', '.join(ENCODER_BACKENDS)}")
    config = _pb().ModelConfig()
    config.name = name
    if backend == "onnxruntime":
        config.platform = "onnxruntime_onnx"
        config.default_model_filename = model_file or "model.onnx"
    elif backend == "tensorrt":
        config.platform = "tensorrt_plan"
        config.default_model_filename = model_file or "model.plan"
    elif backend == "openvino":  # triton-inference-server/openvino_backend reads ONNX directly
        config.backend = "openvino"
        config.default_model_filename = model_file or "model.onnx"
    else:
        config.backend = "python"
    # Triton's batching owns the first axis only when every tensor shares it (not so for the MLLM language
    # graph: its tile_features are indexed by tile, so Triton must not split or merge them by request)
    batched = graph.batch_aligned
    for t in graph.inputs:
        _tensor(config.input.add(), t, batched=batched)
    for t in graph.outputs:
        _tensor(config.output.add(), t, batched=batched)
    if batched:
        _batching(config, batching)
    else:  # max_batch_size 0: full shapes, one request per execution
        _instances(config, batching)
    for key, value in (parameters or {}).items():
        config.parameters[key].string_value = value
    return config


def python_config(name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], batching: BatchingConfig,
                  *, optional: Iterable[str] = (), parameters: Mapping[str, str] | None = None):
    """Config of a python-backend model (preprocessing, fusion, entry). Shapes exclude the batch
    axis when ``batching.max_batch > 0``; with 0 they are the full shapes."""
    config = _pb().ModelConfig()
    config.name = name
    config.backend = "python"
    optional = set(optional)
    for t in inputs:
        _tensor(config.input.add(), t, batched=False, optional=t.name in optional)
    for t in outputs:
        _tensor(config.output.add(), t, batched=False)
    _batching(config, batching)
    for key, value in (parameters or {}).items():
        config.parameters[key].string_value = value
    return config


@dataclass(frozen=True)
class Step:
    model: str
    inputs: Mapping[str, str]  # model input name -> ensemble tensor
    outputs: Mapping[str, str]  # model output name -> ensemble tensor


def ensemble_config(name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], steps: Sequence[Step],
                    max_batch: int, *, optional: Iterable[str] = ()):
    config = _pb().ModelConfig()
    config.name = name
    config.platform = "ensemble"
    config.max_batch_size = max_batch
    optional = set(optional)
    for t in inputs:
        _tensor(config.input.add(), t, batched=False, optional=t.name in optional)
    for t in outputs:
        _tensor(config.output.add(), t, batched=False)
    for step in steps:
        s = config.ensemble_scheduling.step.add()
        s.model_name = step.model
        s.model_version = -1
        s.input_map.update(step.inputs)
        s.output_map.update(step.outputs)
    return config


def to_pbtxt(config) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(config)


def parse_pbtxt(text: str):
    """Parse config text against Triton's ModelConfig schema (raises with line and column)."""
    from google.protobuf import text_format

    return text_format.Parse(text, _pb().ModelConfig())


def check_ensemble_wiring(ensemble, members: Mapping[str, Any]) -> None:
    """What the protobuf schema cannot check: every step names a member model and only its
    declared inputs/outputs, every step input is produced by the ensemble input or an earlier
    step, and every ensemble output is produced."""
    available = {t.name for t in ensemble.input}
    for step in ensemble.ensemble_scheduling.step:
        if step.model_name not in members:
            raise ValueError(f"ensemble {ensemble.name}: step model {step.model_name!r} is not in the repository")
        member = members[step.model_name]
        declared_in = {t.name for t in member.input}
        declared_out = {t.name for t in member.output}
        for model_input, tensor in step.input_map.items():
            if model_input not in declared_in:
                raise ValueError(f"ensemble {ensemble.name}: {step.model_name} has no input {model_input!r}")
            if tensor not in available:
                raise ValueError(f"ensemble {ensemble.name}: tensor {tensor!r} feeding {step.model_name} is not produced before it")
        required = {t.name for t in member.input if not t.optional}
        missing = required - set(step.input_map)
        if missing:
            raise ValueError(f"ensemble {ensemble.name}: {step.model_name} input(s) {sorted(missing)} are not mapped")
        for model_output, tensor in step.output_map.items():
            if model_output not in declared_out:
                raise ValueError(f"ensemble {ensemble.name}: {step.model_name} has no output {model_output!r}")
            available.add(tensor)
    for t in ensemble.output:
        if t.name not in available:
            raise ValueError(f"ensemble {ensemble.name}: output {t.name!r} is produced by no step")
