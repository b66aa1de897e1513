"""The options of one export (``bgevl-export``'s command line, or :func:`bgevl.export.driver.export` called
from Python); the family roles read them, so they live on the ground floor."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bgevl.core.specs import DEFAULT_MAX_SEQUENCE


@dataclass
class ExportOptions:
    output: Path
    model: str = "tiny"
    model_path: Path | None = None
    random_weights: bool = False
    precision: str = "fp32"
    int8_mode: str = "qdq"
    calibration_data: Path | None = None
    calibration_size: int = 32
    validate: bool = True
    min_cosine: float | None = None
    opt_batch: int | None = None  # None: the model family's default (Family.default_batch)
    max_batch: int | None = None
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE  # MLLM language graph: prompt + image tokens
    force_fp32: bool = False  # allow fp32 for models that declare fp32_too_large
    overwrite: bool = False
    probe_count: int = 8
    command: str | None = None  # the command line, recorded in the manifest
    quality_data: Path | None = None  # retrieval data the export is checked on against the fp32 graphs
    max_recall_drop: float | None = None  # points; None: bgevl.quality.gate.DEFAULT_MAX_RECALL_DROP
    #: attention kernels of the loaded torch modules: eager (traced into the ONNX graphs); the benchmark's
    #: PyTorch baseline (``bgevl.runtime.baseline``) loads the same modules with "sdpa", transformers' default
    attn_implementation: str = "eager"
    #: the values of the family's own options (``GraphExport.add_export_arguments``), by dest
    family_options: dict[str, Any] = field(default_factory=dict)
