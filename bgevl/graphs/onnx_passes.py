"""torch -> ONNX export and the precision passes (fp16, int8), all with the field's own tools.

* export: ``torch.onnx.export(dynamo=True)`` with dynamic axes from the graph's declaration.
* checks: ``onnx.checker`` and ``onnx.shape_inference`` (strict) on every written graph.
* fp16: ``onnxconverter_common.float16`` (the upstream of onnxruntime's copy; the latter names
  the casts of a shared initializer twice and writes an invalid graph when the exporter has
  deduplicated equal weights), with float32 graph inputs/outputs and LayerNorm, Softmax and the
  final L2 normalization (plus RMSNorm and rotary angles, found by structure) held in float32;
  a small pass afterwards keeps those float32 regions exact (the converter rounds values passed
  between kept nodes, and their constants, to float16: ``_keep_float32_regions_exact``).
* int8: ``onnxruntime.quantization``: static QDQ (the explicit-quantization form TensorRT builds
  INT8 engines from) or dynamic (ONNX Runtime CPU serving).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx

from bgevl.core.specs import ONNX_OPSET, GraphSpec

if TYPE_CHECKING:  # pragma: no cover  (types only)
    import torch

#: Protobuf's limit: larger models keep their weights in ``<file>.data`` (ONNX external data).
PROTOBUF_LIMIT = 2 * 1024**3 - 1024**2


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    """Write a model, as one file when it fits in a protobuf, else with external data."""
    path = Path(path)
    data_file = path.with_name(path.name + ".data")
    if data_file.exists():
        data_file.unlink()
    if model.ByteSize() < PROTOBUF_LIMIT:
        onnx.save_model(model, str(path))
    else:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_file.name, size_threshold=1024)


def check_onnx(path: Path) -> None:
    """onnx.checker (full check, path-based so external data works) and strict shape inference."""
    onnx.checker.check_model(str(path), full_check=True)


def torch_dynamic_shapes(spec: GraphSpec) -> dict[str, dict[int, "torch.export.Dim"]]:
    """``torch.onnx.export``'s ``dynamic_shapes`` from the graph's declaration (one Dim per axis name)."""
    import torch

    dims: dict[str, torch.export.Dim] = {}
    dynamic_shapes: dict[str, dict[int, torch.export.Dim]] = {}
    for tensor in spec.inputs:
        axes = {}
        for axis, dim in tensor.dynamic_axes().items():
            # torch.export specializes sizes 0 and 1, so the exported range starts at 2; the
            # resulting graph still runs at 1 (the axis stays symbolic in ONNX). torch also needs
            # max > min, so a declared max of 2 is traced with 3.
            axes[axis] = dims.setdefault(dim.name, torch.export.Dim(dim.name, min=2, max=max(dim.max, 3)))
        dynamic_shapes[tensor.name] = axes
    return dynamic_shapes


def export_torch_graph(module, spec: GraphSpec, example: Mapping[str, np.ndarray], path: Path) -> None:
    """Export ``module`` to ``path`` with the inputs, outputs and dynamic axes of ``spec``."""
    import torch

    dynamic_shapes = torch_dynamic_shapes(spec)
    args = tuple(torch.from_numpy(np.ascontiguousarray(example[t.name])) for t in spec.inputs)
    for tensor, arg in zip(spec.inputs, args):
        for axis in tensor.dynamic_axes():
            if arg.shape[axis] < 2:
                raise ValueError(f"example input {tensor.name} needs size >= 2 on dynamic axis {axis}")
    with tempfile.TemporaryDirectory() as tmp, _quiet_exporter():
        raw = Path(tmp) / spec.filename
        torch.onnx.export(
            module, args, str(raw), input_names=spec.input_names, output_names=spec.output_names,
            dynamic_shapes=dynamic_shapes, opset_version=ONNX_OPSET, dynamo=True, verbose=False,
            external_data=True,
        )
        model = onnx.load(str(raw))  # pulls the exporter's external data into memory
    model.producer_name = "bgevl-export"
    save_onnx(model, path)
    check_onnx(path)


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter prints its steps to stdout and warns about internals; keep stdout
    for the command's result and show the exporter's chatter only in verbose logging."""
    buffer = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buffer):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        yield
    logging.getLogger("bgevl").debug("torch.onnx.export output:\n%s", buffer.getvalue())


def nodes_between_outputs(model: onnx.ModelProto, normalized: str, unnormalized: str) -> list[str]:
    """Names of the nodes that compute ``normalized`` from ``unnormalized`` (the final L2 norm).

    Found by structure, not by op type: the ancestors of the normalized output that are not
    ancestors of the unnormalized one.
    """
    producer = {out: node for node in model.graph.node for out in node.output}

    def ancestors(output: str) -> set[str]:
        seen: set[str] = set()
        stack = [output]
        while stack:
            node = producer.get(stack.pop())
            if node is None or node.name in seen:
                continue
            seen.add(node.name)
            stack.extend(node.input)
        return seen

    return sorted(ancestors(normalized) - ancestors(unnormalized))


#: Ops kept in float32 in the fp16 graph: LayerNorm overflows and Softmax loses precision in
#: fp16 (NVIDIA/TensorRT#2781, #4111). The final normalization is added per graph by structure.
FP16_BLOCKED_OPS = ("LayerNormalization", "Softmax")


def convert_to_fp16(model: onnx.ModelProto, keep_fp32_nodes: Iterable[str]) -> onnx.ModelProto:
    import warnings

    from onnxconverter_common.float16 import convert_float_to_float16

    large = model.ByteSize() >= PROTOBUF_LIMIT
    if large:
        # The converter's own shape inference serializes the model in memory, which protobuf refuses
        # over 2 GB; infer shapes from a file (onnx's path-based inference) and skip that step.
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            save_onnx(model, path)
            onnx.shape_inference.infer_shapes_path(str(path), str(path))
            model = onnx.load(str(path))
    keep_fp32_nodes = set(keep_fp32_nodes)
    kept = lambda n: n.op_type in FP16_BLOCKED_OPS or n.name in keep_fp32_nodes  # noqa: E731
    _unshare_float_initializers(model, kept)
    kept_constants = _float32_constants_of(model, kept)
    with warnings.catch_warnings():
        # "the float32 number X will be truncated": tiny constants (epsilons) clamp to fp16's range.
        warnings.filterwarnings("ignore", message="the float32 number", category=UserWarning)
        converted = convert_float_to_float16(
            model, keep_io_types=True, op_block_list=list(FP16_BLOCKED_OPS), node_block_list=list(keep_fp32_nodes),
            disable_shape_infer=large,
        )
    _keep_float32_regions_exact(converted, kept_constants)
    _restore_float32_outputs(converted)
    return converted


def _unshare_float_initializers(model: onnx.ModelProto, kept) -> None:
    """Give the converted nodes their own copy of a float32 initializer that a kept (float32) node reads too.

    ONNX Runtime's graph optimizer (``quant_pre_process``, before quantization) shares equal constants
    (``ConstantSharing``: the zero biases of a LayerNorm and of a Linear become one tensor); the converter
    then keeps that tensor float32 for the LayerNorm and feeds it, uncast, to the float16 Add, an invalid graph.
    """
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in set(node.input):
            readers.setdefault(name, []).append(node)
    for init in list(model.graph.initializer):
        nodes = readers.get(init.name, [])
        if init.data_type != onnx.TensorProto.FLOAT or not any(map(kept, nodes)) or all(map(kept, nodes)):
            continue
        copy = onnx.TensorProto()
        copy.CopyFrom(init)
        copy.name = f"{init.name}_unshared"
        model.graph.initializer.append(copy)
        for node in nodes:
            if not kept(node):
                node.input[:] = [copy.name if i == init.name else i for i in node.input]


def _float32_constants_of(model: onnx.ModelProto, kept) -> dict[str, np.ndarray]:
    """The float32 initializers and Constant-node values read by the nodes ``kept`` selects, copied
    before the converter rewrites them in place."""
    from onnx import numpy_helper

    names = {name for node in model.graph.node if kept(node) for name in node.input}
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer
              if i.name in names and i.data_type == onnx.TensorProto.FLOAT}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] in names:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None and value.data_type == onnx.TensorProto.FLOAT:
                values[node.output[0]] = numpy_helper.to_array(value)
    return values


def _keep_float32_regions_exact(model: onnx.ModelProto, kept_constants: Mapping[str, np.ndarray]) -> None:
    """Undo two roundings that onnxconverter_common (1.16) leaves inside the regions it keeps in float32.

    * ``float32 -> Cast(to fp16) -> Cast(to fp32)``: the converter wraps each kept node on its own, so
      a value passed from one kept node to the next is rounded to float16 on the way. Its own clean-up
      (``remove_unnecessary_cast_node``) misses every float16 value read by more than one node: that
      branch compares ``to`` with 32/16 rather than the TensorProto codes 1/10 (onnxconverter-common#271,
      onnxruntime#20346). Measured on the full-width Mistral decoder: the
      rotary angle ``position x inv_freq`` (about 2000 rad at position 2000, where float16's spacing is
      1-2 rad) went through float16 between the Mul and the Concat, and fp16 parity fell to a
      cosine of 0.92; the RMSNorm's ``x^2`` went through float16 between Pow and ReduceMean, where it
      overflows above 256.
    * ``float16 constant -> Cast(to fp32)``: a float32 constant of a kept node that the converter
      stored as float16 (it does so when the tensor has value_info), rotary ``inv_freq`` among them.
      The kept node gets the original float32 value.

    onnxruntime.transformers' ``OnnxModel.remove_cascaded_cast_nodes`` (the workaround suggested in
    onnxruntime#20346) rewires every Cast->Cast pair, which changes values for pairs such as
    float->int->float; this pass removes only the float32->float16->float32 round trips, which
    makes values exact and changes nothing else.
    """
    from onnx import numpy_helper

    graph = model.graph
    FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    constant_types = {i.name: i.data_type for i in graph.initializer}
    constant_types.update({n.output[0]: a.t.data_type for n in graph.node if n.op_type == "Constant"
                           for a in n.attribute if a.name == "value"})
    types = {**{v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input]}, **constant_types}
    producer = {out: node for node in graph.node for out in node.output}
    graph_outputs = {o.name for o in graph.output}
    replace: dict[str, str] = {}  # output of a Cast(to fp32) -> the exact float32 tensor to read instead
    added: dict[str, str] = {}
    for node in graph.node:
        if _cast_target(node) != FLOAT or node.output[0] in graph_outputs:
            continue
        source = node.input[0]
        parent = producer.get(source)
        if parent is not None and _cast_target(parent) == FLOAT16 and types.get(parent.input[0]) == FLOAT:
            replace[node.output[0]] = parent.input[0]
        elif source in kept_constants and constant_types.get(source) == FLOAT16:
            if source not in added:
                added[source] = f"{source}_float32"
                graph.initializer.append(numpy_helper.from_array(kept_constants[source].astype(np.float32), added[source]))
            replace[node.output[0]] = added[source]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in replace:
                node.input[i] = replace[name]
    _prune_dead_casts_and_initializers(model)


def _cast_target(node: onnx.NodeProto | None) -> int | None:
    """The ``to`` type of a Cast node; None for anything else."""
    if node is None or node.op_type != "Cast":
        return None
    return next((a.i for a in node.attribute if a.name == "to"), None)


def _prune_dead_casts_and_initializers(model: onnx.ModelProto) -> None:
    """Drop the Cast nodes and initializers nothing reads any more, and their value_info. Deletes by
    index: ``remove`` compares messages (quadratic on a large graph) and rebuilding the initializer
    list would copy every weight."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    while True:
        read = {name for node in graph.node for name in node.input} | outputs
        dead = [i for i, n in enumerate(graph.node) if n.op_type == "Cast" and not any(o in read for o in n.output)]
        if not dead:
            break
        for i in reversed(dead):
            del graph.node[i]
    for i in reversed([i for i, init in enumerate(graph.initializer) if init.name not in read]):
        del graph.initializer[i]
    known = {o for node in graph.node for o in node.output} | {i.name for i in graph.initializer} | {i.name for i in graph.input}
    for i in reversed([i for i, v in enumerate(graph.value_info) if v.name not in known]):
        del graph.value_info[i]


FamilyKept = Callable[[onnx.ModelProto], dict[str, list[str]]]


def fp16_model(model: onnx.ModelProto, normalized_outputs: tuple[str, str] | None = None,
               family_kept: FamilyKept | None = None) -> tuple[onnx.ModelProto, dict]:
    """``model`` in float16 with LayerNorm and Softmax (by op type) and, found by structure, RMSNorms, rotary
    positions/angles and the final L2 normalization kept in float32, plus what the model family keeps
    (``family_kept``: ``Family.fp16_keep_float32``). Returns the converted model and what was done."""
    kept = {
        "RMSNorm": rms_norm_nodes(model),
        "rotary positions and angles": rotary_nodes(model),
        "final L2 normalization": nodes_between_outputs(model, *normalized_outputs) if normalized_outputs else [],
        **(family_kept(model) if family_kept else {}),
    }
    keep = [node for nodes in kept.values() for node in nodes]
    return convert_to_fp16(model, keep), {
        "method": "onnxconverter_common float16, float32 inputs/outputs",
        "kept_float32": list(FP16_BLOCKED_OPS) + [what for what, nodes in kept.items() if nodes],
        "kept_float32_nodes": len(keep),
    }


def fp16_graph(src: Path, dst: Path, normalized_outputs: tuple[str, str] | None = None,
               family_kept: FamilyKept | None = None) -> dict:
    """The fp16 pass of every graph (:func:`fp16_model`). Returns what was done, for the manifest."""
    converted, details = fp16_model(onnx.load(str(src)), normalized_outputs, family_kept)
    save_onnx(converted, dst)
    return details


#: Q/DQ with float16 scales (DequantizeLinear writing float16) and float8 types need opset 19.
QDQ_FP16_OPSET = 19


def qdq_to_fp16(path: Path, normalized_outputs: tuple[str, str] | None = None,
                family_kept: FamilyKept | None = None) -> dict:
    """Rewrite the QDQ graph at ``path`` (ONNX Runtime's quantizer output: float32 around the Q/DQ pairs) so
    its unquantized regions are float16 with the fp16 export's float32 islands (:func:`fp16_model`), and its
    Q/DQ scales float16 so each DequantizeLinear writes float16 straight into the GEMM.

    Why: TensorRT 11 builds every network strongly typed, with the types of the graph: a float32 QDQ graph
    gives int8 GEMMs with float32 everywhere else. ModelOpt's ONNX quantizer (``high_precision_dtype="fp16"``)
    writes this form, but its ``onnx`` extra does not install beside this project's pins (it requires
    onnxruntime-gpu~=1.22, a second distribution of the ``onnxruntime`` module beside onnxruntime 1.31, and
    cupy-cuda12x), so this pass does the same on ONNX Runtime's QDQ output with this project's fp16 pass.
    The default-domain opset becomes 19 (float16 Q/DQ scales); opset 18 -> 19 changed no op these graphs use
    in a way that alters results (Cast gained ``saturate``, for float8 only; Q/DQ gained types).
    """
    model = onnx.load(str(path))
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < QDQ_FP16_OPSET:
            opset.version = QDQ_FP16_OPSET
    converted, details = fp16_model(model, normalized_outputs, family_kept)
    save_onnx(converted, path)
    return {"float_regions": "float16 (Q/DQ scales float16)", "opset": QDQ_FP16_OPSET,
            "kept_float32": details["kept_float32"], "kept_float32_nodes": details["kept_float32_nodes"]}


def _restore_float32_outputs(model: onnx.ModelProto) -> None:
    """Make every float graph output float32 again.

    ``keep_io_types`` misses outputs produced by a blocked node: the converter casts the
    blocked node's float32 result back to float16 and the graph output ends up float16. The
    cast feeding such an output is turned into a cast to float32 (a no-op on the float32 value).
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    for output in model.graph.output:
        if output.type.tensor_type.elem_type != onnx.TensorProto.FLOAT16:
            continue
        cast = producers.get(output.name)
        if cast is None or cast.op_type != "Cast":
            raise RuntimeError(f"fp16 conversion left output {output.name} as float16 with no cast to fix")
        for attr in cast.attribute:
            if attr.name == "to":
                attr.i = onnx.TensorProto.FLOAT
        output.type.tensor_type.elem_type = onnx.TensorProto.FLOAT


def weight_matmul_nodes(model: onnx.ModelProto) -> list[str]:
    """MatMul/Gemm nodes with a constant weight: the ones INT8 quantizes.

    Activation x activation MatMuls (attention scores) and the patch-embedding Conv stay in
    float: quantizing them costs accuracy for little speed (reports on ViT-L/14 PTQ).
    """
    constants = {init.name for init in model.graph.initializer}
    constants |= {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    return [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and any(i in constants for i in n.input[:2])]


def output_weight_matmuls(model: onnx.ModelProto, weight_nodes: Iterable[str]) -> list[str]:
    """The weight MatMuls nearest to the graph outputs: walking back from each output, the first weight
    MatMul on every path (CLIP: the visual/text projection that makes the embedding)."""
    weight_nodes = set(weight_nodes)
    producer = {out: node for node in model.graph.node for out in node.output}
    found: set[str] = set()
    seen: set[str] = set()
    stack = [o.name for o in model.graph.output]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.name in weight_nodes:
            found.add(node.name)
        else:
            stack.extend(node.input)
    return sorted(found)


class FeedReader:
    """onnxruntime CalibrationDataReader over a list of input feeds."""

    def __init__(self, feeds: Iterable[Mapping[str, np.ndarray]]):
        self._feeds = list(feeds)
        self._it: Iterator | None = None
        self.rewind()

    def get_next(self):
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter([dict(f) for f in self._feeds])


def _strip_value_info(src: Path, dst: Path) -> None:
    # The exporter's value_info can disagree with onnx's own inference once equal initializers
    # are deduplicated ("Inferred shape and existing shape differ"); quantization re-infers it.
    model = onnx.load(str(src))
    del model.graph.value_info[:]
    save_onnx(model, dst)


@contextlib.contextmanager
def _prepared_for_quantization(src: Path) -> Iterator[tuple[Path, bool]]:
    """(the prepared graph, whether it has external data) in a temporary directory: the exporter's value_info
    dropped, then ONNX Runtime's recommended pre-processing (shape inference + graph optimization)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        stripped, prepared = Path(tmp) / "stripped.onnx", Path(tmp) / "prepared.onnx"
        _strip_value_info(src, stripped)
        large = stripped.with_name(stripped.name + ".data").exists()
        quant_pre_process(str(stripped), str(prepared), skip_symbolic_shape=True, save_as_external_data=large)
        yield prepared, large


#: Q/DQ on a quantized MatMul's or Gemm's inputs only, its output left float: where TensorRT's rules and NVIDIA
#: ModelOpt put them (ONNX Runtime's default also quantizes every output, which then feeds float ops through a
#: second rounding). Measured on the BGE-VL-base architecture (random weights): min cosine image / text /
#: composed 0.99971 / 0.99882 / 0.99925 with outputs quantized, 0.99981 / 0.99932 / 0.99954 without
GEMM_INPUTS_ONLY = {"OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]}


def quantize_int8(src: Path, dst: Path, mode: str, calibration_feeds: Sequence[Mapping[str, np.ndarray]] | None,
                  normalized_outputs: tuple[str, str] | None = None, family_kept: FamilyKept | None = None) -> dict:
    """INT8 from the fp32 graph ``src``. Returns what was done, for the manifest. ``qdq`` (the TensorRT form)
    is then made float16 outside the Q/DQ pairs (:func:`qdq_to_fp16`, with ``normalized_outputs`` and
    ``family_kept`` as for the fp16 pass)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    nodes = weight_matmul_nodes(onnx.load(str(src), load_external_data=False))
    with _prepared_for_quantization(src) as (prepared, large):
        if mode == "qdq":
            if not calibration_feeds:
                raise ValueError("static INT8 needs calibration data")
            quantize_static(
                str(prepared), str(dst), FeedReader(calibration_feeds), quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                nodes_to_quantize=nodes, calibrate_method=CalibrationMethod.MinMax, use_external_data_format=large,
                # TensorRT's explicit quantization wants symmetric int8 (zero point 0).
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, **GEMM_INPUTS_ONLY},
            )
            return {"method": "static QDQ (QuantizeLinear/DequantizeLinear)", "activations": "int8 symmetric per-tensor",
                    "weights": "int8 symmetric per-channel", "calibration": "MinMax", "quantized_nodes": len(nodes),
                    **qdq_to_fp16(dst, normalized_outputs, family_kept)}
        if mode == "qdq-u8":
            if not calibration_feeds:
                raise ValueError("static INT8 needs calibration data")
            # the output projection stays float: one small MatMul on the pooled token, and the one whose
            # error reaches the embedding undiluted (on the base architecture it alone moved the text
            # embeddings' min cosine from 0.99906 to 0.99934, images from 0.99975 to 0.99985)
            kept_float = output_weight_matmuls(onnx.load(str(src), load_external_data=False), nodes)
            nodes = [n for n in nodes if n not in kept_float]
            # uint8 (asymmetric) activations: on x86 ONNX Runtime fuses a QDQ MatMul into QLinearMatMul only
            # for uint8 activations, or for int8 ones whose QuantizeLinear has a single consumer
            # (qdq_s8_to_u8.cc), so the s8 form above runs the Q/K/V projections (one Q, three consumers)
            # as DequantizeLinear + float MatMul; OpenVINO runs both forms in int8
            quantize_static(
                str(prepared), str(dst), FeedReader(calibration_feeds), quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                nodes_to_quantize=nodes, calibrate_method=CalibrationMethod.MinMax, use_external_data_format=large,
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True, **GEMM_INPUTS_ONLY},
            )
            return {"method": "static QDQ (QuantizeLinear/DequantizeLinear) for CPU engines",
                    "activations": "uint8 asymmetric per-tensor", "weights": "int8 symmetric per-channel",
                    "calibration": "MinMax", "quantized_nodes": len(nodes),
                    "float_nodes": {"output projection": kept_float}}
        if mode == "dynamic":
            # reduce_range: 7-bit weights, so that uint8 x int8 pair sums fit VPMADDUBSW's 16 bits on CPUs without
            # VNNI (AVX2-only, e.g. AMD Zen 3), where full-range weights saturate (ONNX Runtime's quantization
            # guide; measured on Zen 3: tiny CLIP text min cosine 0.9635 full range). The artifact is served on
            # whatever CPU the user has, so it is made portable rather than tuned to the exporting machine.
            quantize_dynamic(str(prepared), str(dst), weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                             use_external_data_format=large, per_channel=True, reduce_range=True)
            return {"method": "dynamic (ONNX Runtime MatMulInteger; CPU serving)",
                    "weights": "int8 per-channel, 7-bit range (reduce_range: exact on CPUs without VNNI)",
                    "activations": "uint8, quantized at run time", "quantized_nodes": len(nodes)}
    raise ValueError(f"unknown int8 mode {mode!r}")


def quantize_fp8(src: Path, dst: Path, calibration_feeds: Sequence[Mapping[str, np.ndarray]],
                 normalized_outputs: tuple[str, str] | None = None, family_kept: FamilyKept | None = None) -> dict:
    """FP8 (E4M3) from the fp32 graph ``src``: ONNX Runtime's static QDQ quantizer with float8 activations and
    weights on the MatMul/Gemm nodes with a constant weight (:func:`weight_matmul_nodes`: the patch-embedding
    convolution and the attention matmuls stay unquantized, as NVIDIA advises for ViT FP8), then float16
    around the Q/DQ pairs with the fp16 export's float32 islands (:func:`qdq_to_fp16`).

    Per-tensor scales for both (TensorRT's FP8 form, as ModelOpt writes it). ONNX Runtime calibrates float8
    only with its ``Distribution`` method, whose scale comes from each tensor's spread (about 4.5 standard
    deviations reach E4M3's 448), which saturates the outliers of post-LayerNorm activations; the activation
    scales are then replaced by max calibration (amax / 448, ModelOpt's default) from ONNX Runtime's MinMax
    calibrator (:func:`_max_calibrated_activation_scales`). Measured on the tiny CLIP (random weights), min
    cosine of the text tower to the fp32 reference: 0.9886 with the spread scales, 0.9933 with max ones.
    Opset 19 (float8 types). ONNX Runtime CPU runs the result with its Q/DQ fusion off
    (``bgevl.runtime.providers.create_session``).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not calibration_feeds:
        raise ValueError("fp8 needs calibration data")
    nodes = weight_matmul_nodes(onnx.load(str(src), load_external_data=False))
    with _prepared_for_quantization(src) as (prepared, large), _quiet_quantizer():
        quantize_static(
            str(prepared), str(dst), FeedReader(same_shape_feeds(calibration_feeds)), quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QFLOAT8E4M3FN, weight_type=QuantType.QFLOAT8E4M3FN, per_channel=False,
            nodes_to_quantize=nodes, calibrate_method=CalibrationMethod.Distribution, use_external_data_format=large,
        )
        rescaled = _max_calibrated_activation_scales(prepared, dst, same_shape_feeds(calibration_feeds), large)
    return {"method": "static QDQ (QuantizeLinear/DequantizeLinear), FP8 E4M3", "activations": "float8e4m3fn per-tensor",
            "weights": "float8e4m3fn per-tensor", "rescaled_activations": rescaled,
            "calibration": "activations: max (amax / 448); weights: ONNX Runtime's Distribution scale",
            "quantized_nodes": len(nodes), "unquantized": "patch-embedding convolution, attention matmuls",
            **qdq_to_fp16(dst, normalized_outputs, family_kept)}


#: The largest finite FP8 E4M3 value.
E4M3_MAX = 448.0


def _max_calibrated_activation_scales(prepared: Path, quantized: Path, feeds: Sequence[Mapping[str, np.ndarray]],
                                      large: bool) -> int:
    """Set the scale of every activation QuantizeLinear of ``quantized`` to amax / 448 of its input over
    ``feeds`` (ONNX Runtime's MinMax calibrator on the ``prepared`` float graph); returns how many."""
    from onnx import numpy_helper
    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    model = onnx.load(str(quantized))
    initializers = {init.name: init for init in model.graph.initializer}
    activations = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[1] in initializers
                   and n.input[0] not in initializers]
    with tempfile.TemporaryDirectory() as tmp:
        calibrator = create_calibrator(str(prepared), calibrate_method=CalibrationMethod.MinMax,
                                       augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       use_external_data_format=large)
        calibrator.collect_data(FeedReader(feeds))
        ranges = calibrator.compute_data()
    count = 0
    for node in activations:
        if node.input[0] not in ranges:
            continue
        low, high = ranges[node.input[0]].range_value
        scale = initializers[node.input[1]]
        amax = max(abs(float(low)), abs(float(high)), 1e-12)
        dtype = numpy_helper.to_array(scale).dtype
        scale.CopyFrom(numpy_helper.from_array(np.asarray(amax / E4M3_MAX, dtype=dtype), scale.name))
        count += 1
    save_onnx(model, quantized)
    return count


def same_shape_feeds(feeds: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Calibration batches zero-padded to one shape per input. ONNX Runtime's histogram calibrator (the
    ``Distribution`` method) stacks every batch's activations into one array, which fails on text batches
    padded to different lengths; the zero padding is masked out (attention mask 0, token id 0)."""
    names = list(feeds[0]) if feeds else []
    shapes = {n: np.max([f[n].shape[1:] for f in feeds], axis=0) for n in names if np.ndim(feeds[0][n]) > 1}
    return [{n: np.pad(a, [(0, 0)] + [(0, int(m) - d) for m, d in zip(shapes[n], a.shape[1:])]) if n in shapes else a
             for n, a in feed.items()} for feed in feeds]


@contextlib.contextmanager
def _quiet_quantizer():
    """The float8 quantizer prints its calibration steps to stdout and warns that it raises the opset to 19
    (which :func:`qdq_to_fp16` does anyway); its histograms of tensors it does not quantize (the attention
    mask's float32 minimum) overflow with RuntimeWarnings, harmless since only the quantized tensors' scales
    are used, and those are checked finite by the tests. Keep stdout for the command's result."""
    buffer = io.StringIO()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(buffer), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=RuntimeWarning)
            yield
    finally:
        root.setLevel(level)
    logging.getLogger("bgevl").debug("onnxruntime.quantization output:\n%s", buffer.getvalue())


def file_size(path: Path) -> int:
    data = Path(str(path) + ".data")
    return os.path.getsize(path) + (os.path.getsize(data) if data.exists() else 0)


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def rms_norm_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes of the RMSNorms (Mistral/Llama) as the exporter decomposes them: Pow(x, 2) ->
    ReduceMean -> Add(eps) -> Sqrt -> Reciprocal -> Mul(x, .). Held in float32 by the fp16 pass:
    the square of a hidden state over 256 overflows float16 (transformers computes the RMSNorm in
    float32 for the same reason)."""
    consumers = _consumers(model)
    chain = ("ReduceMean", "Add", "Sqrt", "Reciprocal", "Mul")
    keep: list[str] = []
    for node in model.graph.node:
        if node.op_type != "Pow":
            continue
        found, current = [node.name], node
        for op in chain:
            nxt = [c for c in consumers.get(current.output[0], []) if c.op_type == op]
            if not nxt:
                break
            current = nxt[0]
            found.append(current.name)
        if len(found) == len(chain) + 1:
            keep.extend(found)
    return keep


def quantize_weights_int8(src: Path, dst: Path, mode: str) -> dict:
    """Weight-only INT8 of every MatMul with a constant weight (activations stay float).

    * ``qdq``: the weight becomes int8 + a per-output-channel float scale feeding a
      DequantizeLinear before the MatMul: the explicit weight-only form TensorRT builds INT8
      weight-only GEMMs from, and ONNX Runtime runs as is. onnxruntime's MatMulNBits quantizer
      writes QDQ only for 4 bits, hence this small pass (symmetric, zero point 0).
    * ``dynamic``: onnxruntime's ``MatMulNBitsQuantizer`` with 8 bits (contrib op MatMulNBits,
      blockwise, ONNX Runtime CPU/CUDA only).
    """
    model = onnx.load(str(src))
    nodes = set(weight_matmul_nodes(model))
    if mode == "dynamic":
        from onnxruntime.quantization import QuantFormat
        from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

        # accuracy_level 1: float activations in the GEMM (the default lets ONNX Runtime quantize them to int8,
        # whose x86 kernels saturate on CPUs without VNNI: Visualized-BGE m3 image min cosine 0.979 on Zen 3)
        config = DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=True, bits=8, accuracy_level=1,
                                              quant_format=QuantFormat.QOperator)
        quantizer = MatMulNBitsQuantizer(model, algo_config=config)
        quantizer.process()
        save_onnx(quantizer.model.model, dst)
        count = sum(1 for n in quantizer.model.model.graph.node if n.op_type == "MatMulNBits")
        return {"method": "weight-only int8 (onnxruntime MatMulNBits, 8 bits, symmetric, block 128)",
                "activations": "float (not quantized)", "quantized_nodes": count}
    if mode != "qdq":
        raise ValueError(f"unknown int8 mode {mode!r}")
    from onnx import numpy_helper

    inits = {init.name: init for init in model.graph.initializer}
    new_inits, new_nodes, count = [], [], 0
    for node in model.graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if node.name not in nodes or weight is None or len(weight.dims) != 2:
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(weight).astype(np.float32)
        scale = np.maximum(np.abs(w).max(axis=0), 1e-12) / 127.0  # per output channel (axis 1 of [K, N])
        q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
        base = f"{node.name}_w8"
        new_inits += [numpy_helper.from_array(q, f"{base}_q"), numpy_helper.from_array(scale.astype(np.float32), f"{base}_scale"),
                      numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{base}_zero")]
        new_nodes.append(onnx.helper.make_node("DequantizeLinear", [f"{base}_q", f"{base}_scale", f"{base}_zero"],
                                               [f"{base}_dq"], name=f"{base}_dequantize", axis=1))
        node.input[1] = f"{base}_dq"
        new_nodes.append(node)
        count += 1
    used = {name for n in new_nodes for name in n.input}
    kept = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + new_inits)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    save_onnx(model, dst)
    return {"method": "weight-only int8 QDQ (int8 weights -> DequantizeLinear -> MatMul)",
            "weights": "int8 symmetric per output channel", "activations": "float (not quantized)",
            "quantized_nodes": count}


def rotary_nodes(model: onnx.ModelProto, max_depth: int = 8) -> list[str]:
    """Nodes of the rotary position embedding: from the Cast of the integer positions to float
    through to the Cos and Sin. Held in float32 by the fp16 pass: float16 represents integers
    exactly only up to 2048, and image queries of BGE-VL-MLLM are about 3000 tokens long, so
    positions (and the angles from them) must stay float32 (transformers computes them in float32)."""
    int_types = {onnx.TensorProto.INT64, onnx.TensorProto.INT32}
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input]}
    consumers = _consumers(model)
    keep: set[str] = set()
    for node in model.graph.node:
        if _cast_target(node) != onnx.TensorProto.FLOAT or types.get(node.input[0]) not in int_types:
            continue
        found, frontier, reached = {node.name}, [node], False
        for _ in range(max_depth):
            nxt = []
            for n in frontier:
                for c in (c for out in n.output for c in consumers.get(out, [])):
                    if c.name in found:
                        continue
                    found.add(c.name)
                    if c.op_type in ("Cos", "Sin"):
                        reached = True
                    else:
                        nxt.append(c)
            frontier = nxt
        if reached:
            keep |= found
    return sorted(keep)
