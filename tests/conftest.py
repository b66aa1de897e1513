"""Shared fixtures: the tiny random-weight CLIP and LLaVA-NeXT (generated, saved, loaded back
through the real path) and their exports at each precision, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from bgevl.families.clip import ClipFamily
from bgevl.families.clip.checkpoint import generate_clip_checkpoint
from bgevl.families.mllm.checkpoint import generate_mllm_checkpoint, load_mllm
from bgevl.export import ExportOptions, run_export
from bgevl.core.registry import get_model_spec


def _has_cuda() -> bool:
    try:
        import onnxruntime as ort

        return "CUDAExecutionProvider" in ort.get_available_providers()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and onnxruntime-gpu/TensorRT; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return generate_clip_checkpoint(get_model_spec("tiny"), tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_reference(tiny_checkpoint):
    """(CLIPModel, CLIPProcessor) loaded from the generated checkpoint: the PyTorch reference."""
    return ClipFamily().load(tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_mllm_reference(tmp_path_factory):
    """(LlavaNextForConditionalGeneration, LlavaNextProcessor) of the generated tiny-mllm checkpoint."""
    path = generate_mllm_checkpoint(get_model_spec("tiny-mllm"), tmp_path_factory.mktemp("ckpt") / "tiny-mllm")
    return load_mllm(path)


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory):
    """Export factory: ``export_dir("fp16")`` -> directory, cached per option set (``family_options`` as a tuple
    of pairs)."""
    cache: dict = {}
    root = tmp_path_factory.mktemp("exports")

    def make(precision: str, model: str = "tiny", **kw) -> Path:
        key = (model, precision, tuple(sorted(kw.items())))
        if key not in cache:
            name = "-".join([model, precision] + [f"{k}_{v}" for k, v in sorted(kw.items())])
            options = {k: dict(v) if k == "family_options" else v for k, v in kw.items()}  # passed as pairs: hashable
            cache[key] = run_export(ExportOptions(output=root / name, model=model, precision=precision, **options),
                                    sink=lambda msg: None)
        return cache[key]

    return make
