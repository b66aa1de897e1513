"""Graph services: ONNX passes (fp16, int8, fp8, checks: :mod:`~bgevl.graphs.onnx_passes`) and the
TensorRT engine build (:mod:`~bgevl.graphs.engines`). They know no model family."""
