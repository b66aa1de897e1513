"""Triton Inference Server packaging of exported BGE-VL models.

Done so far: ``configs`` builds every ``config.pbtxt`` (python-backend, onnxruntime_onnx and
tensorrt_plan encoders, ensembles) as Triton ``ModelConfig`` messages derived from the export's
graph declarations, and checks ensemble wiring. Not built yet: the repository writer, the
python-backend models, ``bgevl-serve`` and the server round-trip tests (issue 4).
"""
