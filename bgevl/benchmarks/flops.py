"""Analytic FLOPs of a benchmark call, counted on the exported graphs themselves.

Every matrix product of the graphs the family's recipe calls is counted from its operand shapes:
``MatMul``/``Gemm`` ``2*M*K*N`` per broadcast batch element (attention's Q@K^T and P@V included:
torch's ``FlopCounterMode`` misses SDPA on CPU, about 4 % of a ViT-B/16), ``Conv``
``2*Cout*Cin/groups*kh*kw`` per output position. Normalizations, softmax and elementwise ops are
O(tokens x width) and left out, as in the usual transformer counts (ViT-B/16: 35.1 GFLOP per
image). The shapes are those of one real call: ONNX's static shape inference loses them behind the
exporters' computed Reshapes, so the graph runs once (ONNX Runtime, the first item of the request)
with the products' operands exposed as outputs, and the count is scaled by the number of items. That item
is fed as the batch runs it (``BenchModel.first_item_feeds``: texts padded to the batch's longest), so the
count is of what the call computes, padding included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

#: Graphs larger than this are not loaded for counting (protobuf's 2 GB limit on an in-memory model).
_MAX_COUNTED_BYTES = 1_800_000_000


def graph_cost(path: Path, feed: Mapping[str, np.ndarray], outputs: list[str]) -> tuple[float, dict[str, np.ndarray]]:
    """(FLOPs, the requested outputs) of one run of an ONNX graph on ``feed``."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    constants = {init.name: tuple(init.dims) for init in model.graph.initializer}
    products = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")]
    exposed = {o.name for o in model.graph.output}
    for name in {t for n in products for t in (*n.input[:2], n.output[0])} - set(constants) - exposed:
        model.graph.output.add().name = name
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every product visible
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(names, dict(feed))))
    shape = {**constants, **{k: v.shape for k, v in values.items()}, **{k: np.asarray(v).shape for k, v in feed.items()}}
    flops = 0.0
    for node in products:
        out = shape[node.output[0]]
        if node.op_type == "Conv":
            flops += 2.0 * float(np.prod(out)) * float(np.prod(shape[node.input[1]][1:]))
        else:
            a = shape[node.input[0]]
            trans_a = any(at.name == "transA" and at.i for at in node.attribute)
            flops += 2.0 * float(np.prod(out)) * (a[0] if node.op_type == "Gemm" and trans_a else a[-1])
    return flops, {name: values[name] for name in outputs}


def recipe_gflop(family: Any, graphs: Mapping[str, Any], paths: Mapping[str, Path], feeds: Mapping[str, np.ndarray],
                 items: int) -> float:
    """GFLOP of the family's recipe for ``items`` items whose first one is ``feeds`` (a one-item request), on
    the graphs ``paths`` (the float export); NaN where a graph is too large to count in memory."""
    from bgevl.graphs.onnx_passes import file_size
    from bgevl.core.family import run_steps

    if any(file_size(p) > _MAX_COUNTED_BYTES for p in paths.values()):
        return float("nan")
    total = [0.0]

    def run(call):
        flops, outputs = graph_cost(paths[call.graph], call.feed, list(call.outputs))
        total[0] += flops
        return outputs

    run_steps(family.steps(dict(feeds), graphs), run)
    return total[0] * items / 1e9
