"""bgevl-export: ONNX/TensorRT export, runtime and Triton packaging for BGE-VL embedding models."""

__version__ = "0.1.0"
