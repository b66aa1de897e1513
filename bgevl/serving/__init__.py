"""Triton Inference Server packaging of exported BGE-VL models.

* ``configs``: every ``config.pbtxt`` as a Triton ``ModelConfig`` message derived from the graph
  declarations (python-backend, onnxruntime_onnx and tensorrt_plan encoders, ensembles);
* ``repository``: the repository writer (``bgevl-export --triton-repo`` / ``triton-repo``);
* ``models``: the python-backend models (preprocessing, ONNX Runtime encoders, fusion, entry);
* ``server``: ``bgevl-serve``, the CPU tritonserver bundled in the nvidia-pytriton wheel.
"""
