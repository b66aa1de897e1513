"""The graphs strongly typed TensorRT engines are built from, checked without a GPU: the int8 (static QDQ)
and fp8 forms are float16 around their Q/DQ pairs with the fp16 export's float32 islands, and ONNX Runtime
on CPU runs them (int8 and float8 Q/DQ at opset 19) against the independent fp32 reference
(transformers' CLIPModel on the checkpoint, as in test_export_parity)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from bgevl.core.errors import BgevlError
from bgevl.export import ExportOptions, run_export
from bgevl.runtime import Embedder
from test_export_parity import IMAGES, TEXTS, normalize, reference_features

T = onnx.TensorProto


def _types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    return types


def _check_typed_qdq_graph(model: onnx.ModelProto, quantized_type: int) -> dict:
    """What a strongly typed engine needs of the graph; returns counts for the caller's assertions."""
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 19
    types = _types(model)
    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    initializers = {i.name for i in model.graph.initializer}
    quantize = [n for n in nodes if n.op_type == "QuantizeLinear"]
    dequantize = [n for n in nodes if n.op_type == "DequantizeLinear"]
    assert quantize and dequantize
    # every Q/DQ scale float16 (DequantizeLinear writes float16 into the GEMM), quantized values of one type
    assert {types[n.input[1]] for n in quantize + dequantize} == {T.FLOAT16}
    scales = {i.name: onnx.numpy_helper.to_array(i).astype(np.float32) for i in model.graph.initializer}
    for node in quantize + dequantize:
        scale = scales[node.input[1]]
        assert np.all(np.isfinite(scale)) and np.all(scale > 0) and np.all(scale < 1), (node.name, scale)
    assert {types[n.output[0]] for n in quantize} == {quantized_type}
    assert {types[n.input[0]] for n in dequantize} == {quantized_type}
    # the GEMMs with a quantized weight read float16 activations through DequantizeLinear on both inputs
    gemms = [n for n in nodes if n.op_type in ("MatMul", "Gemm") and all(
        producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in n.input[:2])]
    weight_gemms = [n for n in gemms if any(producer[i].input[0] in initializers for i in n.input[:2])]
    assert weight_gemms and all(types[n.output[0]] == T.FLOAT16 for n in weight_gemms)
    # attention (activation x activation) matmuls and the patch embedding stay unquantized, in float16
    attention = [n for n in nodes if n.op_type == "MatMul" and n not in gemms]
    assert all(types[n.output[0]] == T.FLOAT16 for n in attention)
    for conv in (n for n in nodes if n.op_type == "Conv"):
        assert all(producer.get(i) is None or producer[i].op_type != "DequantizeLinear" for i in conv.input)
        assert types[conv.output[0]] == T.FLOAT16
    # the fp16 export's float32 islands: LayerNorm, Softmax, the final L2 norm
    fragile = [n for n in nodes if n.op_type in ("LayerNormalization", "Softmax", "ReduceL2")]
    assert {n.op_type for n in fragile} == {"LayerNormalization", "Softmax", "ReduceL2"}
    assert all(types[n.input[0]] == T.FLOAT for n in fragile), [n.name for n in fragile if types[n.input[0]] != T.FLOAT]
    assert {types[o.name] for o in model.graph.output} == {T.FLOAT}
    return {"weight_gemms": len(weight_gemms), "attention": len(attention)}


def _parity_with_pytorch(directory, tiny_reference, bound: float) -> None:
    model, processor = tiny_reference
    ref = {k: normalize(v) for k, v in reference_features(model, processor, images=IMAGES, texts=TEXTS).items()}
    emb = Embedder.load(directory, provider="cpu")
    for kind, got in (("image", emb.encode(images=IMAGES)), ("text", emb.encode(text=TEXTS))):
        cos = np.sum(got * ref[kind], axis=1)
        assert cos.min() >= bound, (kind, cos.min())
        assert np.array_equal(np.argmax(got @ ref[kind].T, axis=1), np.arange(len(got)))  # self-retrieval exact


def test_int8_for_tensorrt_is_fp16_around_int8_qdq_with_fp32_islands(export_dir, tiny_reference):
    directory = export_dir("int8")
    for name, graph in (("vision", "vision.onnx"), ("text", "text.onnx")):
        counts = _check_typed_qdq_graph(onnx.load(str(directory / graph)), T.INT8)
        assert counts["weight_gemms"] == 13 and counts["attention"] == 4, name  # 2 layers: q,k,v,o,fc1,fc2 + projection
    manifest = json.loads((directory / "manifest.json").read_text())
    details = manifest["graphs"]["vision"]["precision_details"]
    assert details["int8_form"] == "static-qdq" and details["float_regions"] == "float16 (Q/DQ scales float16)"
    assert details["kept_float32"] == ["LayerNormalization", "Softmax", "final L2 normalization"]
    assert manifest["validation"]["passed"] and manifest["validation"]["threshold_min_cosine"] == 0.99
    assert all(f["min_cosine"] >= 0.99 for f in manifest["validation"]["figures"].values())
    _parity_with_pytorch(directory, tiny_reference, 0.99)


def test_fp8_is_e4m3_qdq_on_the_weight_gemms_fp16_elsewhere_validated_on_cpu(export_dir, tiny_reference):
    directory = export_dir("fp8")
    for graph in ("vision.onnx", "text.onnx"):
        counts = _check_typed_qdq_graph(onnx.load(str(directory / graph)), T.FLOAT8E4M3FN)
        assert counts["weight_gemms"] == 13
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["precision"] == "fp8" and manifest["int8_mode"] is None
    assert manifest["calibration"]["source"].startswith("built-in synthetic set")
    details = manifest["graphs"]["text"]["precision_details"]
    assert details["activations"] == details["weights"].replace("weights", "activations") == "float8e4m3fn per-tensor"
    assert details["rescaled_activations"] >= 10 and details["opset"] == 19
    assert manifest["validation"]["passed"] and manifest["validation"]["threshold_min_cosine"] == 0.99
    _parity_with_pytorch(directory, tiny_reference, 0.99)


def test_fp8_is_refused_in_one_line_where_it_does_not_apply(tmp_path):
    for model, options, message in [
        ("tiny-mllm", {}, "--precision fp8: the mllm family has no fp8 form; use --precision fp16 or int8"),
        ("tiny", {"calibration_data": tmp_path}, "--calibration-data only applies to --precision int8 and fp8"),
    ]:
        precision = "fp8" if not options else "fp16"
        with pytest.raises(BgevlError) as info:
            run_export(ExportOptions(output=tmp_path / model, model=model, precision=precision, **options),
                       sink=lambda m: None)
        assert str(info.value) == message
        assert not (tmp_path / model).exists()
