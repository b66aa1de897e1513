"""The precision forms families declare, written: a family says which int8 forms it has
(``GraphExport.int8_forms``: each an ``Int8Form`` naming its pass), whether it has fp8 (``supports_fp8``),
its float32 islands (``fp16_keep_float32``) and its calibration feeds (``calibration_feeds``); this module
runs the pass. No family code runs here and no family is named: a new form is a new pass in
:data:`INT8_PASSES` and a declaration in the families that take it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from bgevl.core.family import INT8_METHODS, Int8Form
from bgevl.core.specs import GraphSpec
from bgevl.graphs import onnx_passes
from bgevl.graphs.onnx_passes import FamilyKept

#: the calibration batches of one graph (each a feed)
CalibrationBatches = Sequence[Mapping[str, np.ndarray]]
#: pass name -> (src, dst, calibration batches or None, the graph's normalized outputs, the family's float32 islands)
Int8Pass = Callable[[Path, Path, "CalibrationBatches | None", "tuple[str, str] | None", "FamilyKept | None"],
                    dict[str, Any]]


def _ort(mode: str) -> Int8Pass:
    def run(src: Path, dst: Path, feeds: CalibrationBatches | None, normalized: tuple[str, str] | None,
            kept: FamilyKept | None) -> dict[str, Any]:
        return onnx_passes.quantize_int8(src, dst, mode, feeds, normalized, kept)
    return run


def _weight_only(mode: str) -> Int8Pass:
    def run(src: Path, dst: Path, feeds: CalibrationBatches | None, normalized: tuple[str, str] | None,
            kept: FamilyKept | None) -> dict[str, Any]:
        return onnx_passes.quantize_weights_int8(src, dst, mode)
    return run


#: The int8 passes by name (``Int8Form.pass_name``): ONNX Runtime's static Q/DQ (int8 or uint8 activations)
#: and dynamic quantizers on the weight GEMMs, and weight-only int8 (DequantizeLinear into the MatMuls, or
#: ONNX Runtime's MatMulNBits)
INT8_PASSES: dict[str, Int8Pass] = {
    "static-qdq": _ort("qdq"), "static-qdq-u8": _ort("qdq-u8"), "dynamic": _ort("dynamic"),
    "weight-only-qdq": _weight_only("qdq"), "weight-only-dynamic": _weight_only("dynamic"),
}
assert set(INT8_PASSES) == set(INT8_METHODS), "every declared method has its pass"


def write_int8(form: Int8Form, graph: GraphSpec, src: Path, dst: Path, feeds: Callable[[], list[Any]] | None,
               kept: FamilyKept | None) -> dict[str, Any]:
    """The int8 graph of ``form``; ``feeds`` (calibration batches, made only for calibrated forms). Returns what
    was done, for the manifest."""
    calibration = feeds() if form.calibrated and feeds is not None else None
    if form.calibrated and not calibration:
        raise ValueError(f"int8 form {form.name!r} is calibrated: it needs calibration feeds")
    details = INT8_PASSES[form.pass_name](src, dst, calibration, graph.normalized_output, kept)
    return {**details, "int8_form": form.name, "int8_form_description": form.description}


def write_fp8(graph: GraphSpec, src: Path, dst: Path, feeds: Callable[[], list[Any]], kept: FamilyKept | None) -> dict[str, Any]:
    """The FP8 (E4M3) Q/DQ graph of a family with ``supports_fp8``, calibrated on ``feeds``."""
    return onnx_passes.quantize_fp8(src, dst, feeds(), graph.normalized_output, kept)

