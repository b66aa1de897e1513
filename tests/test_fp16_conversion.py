"""The fp16 pass keeps its float32 regions exact: no value inside them is rounded to float16.

onnxconverter_common wraps each kept node in its own casts, so a value passed between two kept
nodes went float32 -> float16 -> float32, and a kept node's float32 constant could be stored as
float16. On the full-width Mistral decoder this rounded the rotary angles (position x inv_freq,
thousands of radians) and cost fp16 parity (cosine 0.92 at position 2000). The tiny models cannot
show it in their embeddings (their random attention is near uniform), so these tests check the
conversion itself: numerically on a small graph with the exporter's patterns, and structurally on
the real fp16 exports.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bgevl.graphs import onnx_passes

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16


def _rotary_and_rms_norm_graph(inv_freq: np.ndarray, weight: np.ndarray, norm_weight: np.ndarray) -> onnx.ModelProto:
    """positions -> Cast -> Mul(inv_freq) -> Concat(angles, angles) -> Cos/Sin (the exporter's rotary
    pattern), and x -> MatMul -> RMSNorm (Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul) -> Mul(weight)."""
    n, d, h = "positions", len(inv_freq), weight.shape[1]
    nodes = [
        helper.make_node("Cast", [n], ["pos_f"], name="cast_positions", to=FLOAT),
        helper.make_node("Mul", ["pos_f", "inv_freq"], ["angles"], name="angles"),
        helper.make_node("Concat", ["angles", "angles"], ["emb"], name="concat", axis=1),
        helper.make_node("Cos", ["emb"], ["cos_out"], name="cos"),
        helper.make_node("Sin", ["emb"], ["sin_out"], name="sin"),
        helper.make_node("MatMul", ["x", "weight"], ["hidden"], name="proj"),
        helper.make_node("Pow", ["hidden", "two"], ["squared"], name="pow"),
        helper.make_node("ReduceMean", ["squared", "last_axis"], ["mean"], name="mean", keepdims=1),
        helper.make_node("Add", ["mean", "eps"], ["mean_eps"], name="add_eps"),
        helper.make_node("Sqrt", ["mean_eps"], ["rms"], name="sqrt"),
        helper.make_node("Reciprocal", ["rms"], ["inv_rms"], name="reciprocal"),
        helper.make_node("Mul", ["hidden", "inv_rms"], ["normed"], name="scale"),
        helper.make_node("Mul", ["normed", "norm_weight"], ["norm_out"], name="norm_weight_mul"),
    ]
    inits = [
        numpy_helper.from_array(inv_freq[None].astype(np.float32), "inv_freq"),
        numpy_helper.from_array(weight.astype(np.float32), "weight"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array([-1], np.int64), "last_axis"),
        numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
        numpy_helper.from_array(norm_weight.astype(np.float32), "norm_weight"),
    ]
    graph = helper.make_graph(
        nodes, "rotary_and_rms_norm",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["N", 1]),
         helper.make_tensor_value_info("x", FLOAT, ["N", weight.shape[0]])],
        [helper.make_tensor_value_info(o, FLOAT, ["N", s]) for o, s in
         (("cos_out", 2 * d), ("sin_out", 2 * d), ("norm_out", h))],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)  # what onnxruntime reads
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def test_kept_regions_compute_in_float32(tmp_path):
    rng = np.random.default_rng(0)
    # Mistral's rotary frequencies (rope_theta 1e6, head dim 128) and positions up to 4096
    inv_freq = 1.0 / (1e6 ** (np.arange(0, 128, 2, dtype=np.float64) / 128))
    positions = np.arange(0, 4096, 7, dtype=np.int64)[:, None]
    # hidden states of magnitude ~1000: their squares overflow float16 (max 65504)
    weight = rng.standard_normal((16, 32)) * 250
    x = rng.standard_normal((len(positions), 16)).astype(np.float32)
    norm_weight = 1 + 0.1 * rng.standard_normal(32)
    src, dst = tmp_path / "fp32.onnx", tmp_path / "fp16.onnx"
    onnx.save(_rotary_and_rms_norm_graph(inv_freq, weight, norm_weight), str(src))

    details = onnx_passes.fp16_graph(src, dst)
    assert "RMSNorm" in details["kept_float32"] and "rotary positions and angles" in details["kept_float32"]
    converted = onnx.load(str(dst))
    onnx.checker.check_model(converted, full_check=True)
    assert numpy_helper.to_array(next(i for i in converted.graph.initializer if i.name.startswith("weight"))).dtype == np.float16
    assert _float16_round_trips(converted) == []

    session = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    cos, sin, normed = session.run(None, {"positions": positions, "x": x})
    angles = positions.astype(np.float64) * inv_freq[None]
    want_cos, want_sin = np.cos(np.concatenate([angles] * 2, 1)), np.sin(np.concatenate([angles] * 2, 1))
    # only the Cos/Sin results are rounded to float16 (spacing 2^-11 below 1); angles rounded to
    # float16 would be off by up to 1 rad at position 4000
    assert np.abs(cos - want_cos).max() < 1e-3 and np.abs(sin - want_sin).max() < 1e-3
    hidden = x.astype(np.float64) @ weight.astype(np.float16).astype(np.float64)
    want = hidden / np.sqrt(np.mean(hidden**2, -1, keepdims=True) + 1e-5) * norm_weight
    assert np.all(np.isfinite(normed))
    assert np.abs(normed - want).max() < 2e-2  # |want| ~ 1-4; float16 rounding of the MatMul output and weight


def _float16_round_trips(model: onnx.ModelProto) -> list[str]:
    """Cast(to float32) nodes that read a float32 value rounded to float16 (float32 -> Cast(fp16) ->
    Cast(fp32)), or a float16 constant: the places where a kept float32 region loses precision."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input]}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    producer = {out: node for node in model.graph.node for out in node.output}
    float16_initializers = {i.name for i in model.graph.initializer if i.data_type == FLOAT16}

    def cast_to(node):
        return next((a.i for a in node.attribute if a.name == "to"), None) if node is not None and node.op_type == "Cast" else None

    found = []
    for node in model.graph.node:
        if cast_to(node) != FLOAT:
            continue
        parent = producer.get(node.input[0])
        if cast_to(parent) == FLOAT16 and types.get(parent.input[0]) == FLOAT:
            found.append(f"{parent.input[0]} -> {parent.name} -> {node.name}")
        if node.input[0] in float16_initializers:
            found.append(f"float16 initializer {node.input[0]} -> {node.name}")
    return found


@pytest.mark.parametrize("model,graphs", [("tiny", ("vision", "text")), ("tiny-mllm", ("mllm_vision", "mllm_language"))])
def test_fp16_exports_have_no_float16_round_trips(model, graphs, export_dir):
    directory = export_dir("fp16", model=model)
    for name in graphs:
        model_proto = onnx.load(str(directory / f"{name}.onnx"))
        assert _float16_round_trips(model_proto) == [], name
        assert any(i.data_type == FLOAT16 for i in model_proto.graph.initializer), f"{name}: the conversion did nothing"
