"""Export BGE-VL models to ONNX (fp32, fp16, int8) with self-validation; see ``bgevl-export --help``."""

from bgevl.export.driver import ExportOptions, run_export

__all__ = ["ExportOptions", "run_export"]
