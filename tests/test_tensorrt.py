"""TensorRT: everything that needs no GPU runs here (profiles, precision plans, sidecar and version
checks, the command line's fallback and messages, provider options, the reference set that engines
are validated on); the tests that build and run engines are marked ``gpu`` and skip without one.

On a CUDA machine: ``pip install '.[tensorrt,test]'`` then ``pytest -m gpu tests/test_tensorrt.py``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from bgevl.core.errors import BgevlError
from bgevl.graphs.engines import axis_ranges, check_device_for, precision_plan, profile_shapes
from bgevl.core.parity import VALIDATION_ARRAYS, load_arrays, parity
from bgevl.core.manifest import read_manifest
from bgevl.runtime import Embedder
from bgevl.runtime.providers import provider_options_for
from bgevl.runtime.tensorrt import DeviceInfo, check_compatible, check_tensorrt_version, read_sidecar, tensorrt_status
from bgevl.families.clip.graphs import clip_graph_specs
from bgevl.families.mllm.graphs import mllm_graph_specs

CLIP = clip_graph_specs(image_size=224, max_text_length=77, embed_dim=512, opt_batch=8, max_batch=64)
MLLM = mllm_graph_specs(tile_size=336, tile_tokens=576, hidden_size=4096, max_batch=8, opt_batch=2, max_sequence=4096)


def test_profiles_follow_the_declaration_and_the_command_line():
    assert profile_shapes(CLIP["vision"]) == {"pixel_values": {"min": [1, 3, 224, 224], "opt": [8, 3, 224, 224],
                                                               "max": [64, 3, 224, 224]}}
    text = profile_shapes(CLIP["text"], axis_ranges(CLIP["text"], max_batch=16, opt_batch=4))
    assert text["input_ids"] == text["attention_mask"] == {"min": [1, 1], "opt": [4, 16], "max": [16, 77]}
    language = MLLM["mllm_language"]
    shapes = profile_shapes(language, axis_ranges(language, max_sequence=2048, max_tiles=10))
    assert shapes["input_ids"]["max"] == [8, 2048] and shapes["input_ids"]["opt"] == [2, 2048]
    assert shapes["tile_features"] == {"min": [1, 576, 4096], "opt": [10, 576, 4096], "max": [10, 576, 4096]}
    assert shapes["image_feature_index"]["max"] == [8, 2048]
    assert profile_shapes(MLLM["mllm_vision"], axis_ranges(MLLM["mllm_vision"], max_tiles=10))["image_tiles"]["max"] == [10, 3, 336, 336]
    with pytest.raises(BgevlError, match="profile for axis 'batch'"):
        axis_ranges(CLIP["vision"], opt_batch=32, max_batch=16)


def test_precision_plans_are_strongly_typed_with_no_precision_flags():
    for precision, form in [("fp32", None), ("fp16", None), ("fp8", None), ("int8", "static-qdq"),
                            ("int8", "weight-only-qdq")]:
        plan = precision_plan(precision, form)
        assert plan.strongly_typed and plan.precision == precision and "strongly typed" in plan.reason
        assert set(plan.cleared_flags) <= {"TF32"}  # the only flag touched, and only cleared
    assert precision_plan("fp32").cleared_flags == ("TF32",) and precision_plan("fp32").describe() == "strongly typed, TF32 off"
    assert "fp16 around them" in precision_plan("int8", "static-qdq").reason
    for cpu_form in ("dynamic", "weight-only-dynamic", "static-qdq-u8"):
        with pytest.raises(BgevlError, match=f"int8 form is '{cpu_form}' \\(a CPU form.*TensorRT does not build.*--int8-mode qdq"):
            precision_plan("int8", cpu_form)


def test_fp8_engines_refuse_gpus_below_compute_capability_8_9():
    fp8 = precision_plan("fp8")
    for cc in ("8.9", "9.0", "10.0", "12.0"):
        check_device_for(fp8, DeviceInfo("gpu", cc))
    with pytest.raises(BgevlError, match=r"^fp8 engines need a GPU of compute capability 8.9 or newer .*; NVIDIA A100-SXM4-80GB "
                                         r"is 8.0: export with --precision int8 or fp16 for it$"):
        check_device_for(fp8, DeviceInfo("NVIDIA A100-SXM4-80GB", "8.0"))
    check_device_for(precision_plan("fp16"), DeviceInfo("Tesla T4", "7.5"))  # only fp8 asks for more


def test_tensorrt_outside_the_supported_range_is_refused_in_one_line():
    for ok in ("10.12.0.36", "10.16.1.11", "11.0.0.114", "11.4.0.106"):
        check_tensorrt_version(ok)
    for old in ("10.11.0.33", "10.7.0", "12.0.0", "8.6.1", "not-a-version"):
        with pytest.raises(BgevlError) as info:
            check_tensorrt_version(old)
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"TensorRT {old} is installed; ")
        assert "strongly typed engines with TensorRT >=10.12,<12: pip install 'tensorrt>=10.12,<12'" in message


def test_engines_built_elsewhere_are_refused_with_a_rebuild_message(tmp_path):
    sidecar = {"tensorrt_version": "10.7.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    check_compatible(sidecar, "10.7.0", DeviceInfo("NVIDIA H100 80GB HBM3", "9.0"))  # same: fine
    check_compatible(sidecar, "10.7.0", DeviceInfo("NVIDIA H200", "9.0"))  # same compute capability loads
    with pytest.raises(BgevlError, match=r"built for TensorRT 10.7.0 \(this machine has 10.9.0\).*rebuild them here "
                                         r"with `bgevl-export build-engines DIR`"):
        check_compatible(sidecar, "10.9.0", DeviceInfo("NVIDIA H100 80GB HBM3", "9.0"))
    with pytest.raises(BgevlError, match=r"compute capability 9.0 on NVIDIA H100 80GB HBM3 \(this GPU, NVIDIA L4, is 8.9\)"):
        check_compatible(sidecar, "10.7.0", DeviceInfo("NVIDIA L4", "8.9"))
    with pytest.raises(BgevlError, match="has no sidecar vision.plan.json.*rebuild"):
        read_sidecar(tmp_path / "vision.plan")


def test_provider_options_expose_precision_cache_and_overrides(tmp_path):
    names = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    trt, cuda, cpu = provider_options_for(names, tmp_path, precision="fp16", engine_cache_dir=tmp_path / "cache",
                                          overrides={"tensorrt": {"trt_max_workspace_size": 1 << 30}, "cuda": {"device_id": 1}})
    assert trt[0] == names[0] and trt[1]["trt_fp16_enable"] and not trt[1]["trt_int8_enable"]
    assert trt[1]["trt_engine_cache_path"] == str(tmp_path / "cache") and trt[1]["trt_max_workspace_size"] == 1 << 30
    assert cuda == (names[1], {"device_id": 1}) and cpu == names[2]
    assert provider_options_for(names[:1], tmp_path, precision="int8")[0][1]["trt_int8_enable"]
    with pytest.raises(BgevlError, match="provider options for \\['tensorrtt'\\]"):
        provider_options_for(names, tmp_path, overrides={"tensorrtt": {}})


@pytest.mark.skipif(tensorrt_status()[0], reason="checks the messages of a machine without TensorRT or a GPU")
def test_without_tensorrt_the_runtime_and_builder_say_what_is_missing(export_dir):
    from bgevl.runtime.tensorrt import TensorRTRunner

    directory = export_dir("fp16")
    with pytest.raises(BgevlError, match="has no TensorRT engine for graph 'vision'; build the engines with "
                                         "`bgevl-export build-engines"):
        Embedder.load(directory, backend="tensorrt")
    with pytest.raises(BgevlError, match="TensorRT is not installed.*pip install 'bgevl-export\\[tensorrt\\]'"):
        TensorRTRunner(read_manifest(directory).graph_spec("vision"), directory / "tensorrt" / "vision.plan")
    with pytest.raises(BgevlError, match="backend 'tensorrrt'"):
        Embedder.load(export_dir("fp16"), backend="tensorrrt")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "bgevl.export.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(tensorrt_status()[0], reason="checks the fallback of a machine without TensorRT or a GPU")
def test_cli_format_auto_falls_back_to_onnx_with_one_line_and_tensorrt_fails_early(tmp_path, export_dir):
    out = tmp_path / "auto"
    result = _cli("--model", "tiny", "--output", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "TensorRT engines not built" in line]
    assert len(lines) == 1 and f"bgevl-export build-engines {out.resolve()}" in lines[0]
    assert (out / "vision.onnx").is_file() and not read_manifest(out).engines

    result = _cli("--model", "tiny", "--output", str(tmp_path / "trt"), "--format", "tensorrt")
    assert result.returncode == 2 and "--format tensorrt: TensorRT is not installed" in result.stderr
    assert "build-engines" in result.stderr and not (tmp_path / "trt").exists()  # failed before exporting

    result = _cli("build-engines", str(export_dir("fp16")))
    assert result.returncode == 2 and "TensorRT is not installed" in result.stderr and "Traceback" not in result.stderr

    result = _cli("--model", "tiny", "--output", str(tmp_path / "onnx"), "--format", "onnx", "--quiet")
    assert result.returncode == 0 and "TensorRT" not in result.stderr


@pytest.mark.parametrize("model,precision", [("tiny", "fp16"), ("tiny-mllm", "fp32"), ("tiny-screenshot", "fp16")])
def test_the_reference_set_reproduces_the_export_figures(export_dir, model, precision):
    """The engines are validated by the same code on the same arrays: with ONNX Runtime as the runner it must
    give the very figures the export recorded."""
    from bgevl.core.registry import get_family
    from bgevl.runtime.runners import open_runners, runner_call

    directory = export_dir(precision, model=model)
    manifest = read_manifest(directory)
    arrays = load_arrays(directory / VALIDATION_ARRAYS)
    figures = parity(get_family(manifest.family), manifest.graph_specs(), arrays,
                     runner_call(open_runners(manifest, provider="cpu")))
    recorded = manifest.validation.figures
    assert set(figures) == set(recorded)
    for name, f in figures.items():
        assert f["min_cosine"] == pytest.approx(recorded[name]["min_cosine"], abs=1e-7), name
        assert f["n"] == recorded[name]["n"] >= 4


def test_triton_tensorrt_configs_take_the_engine_profile(export_dir, tmp_path):
    """The repository writer's tensorrt_plan configs, from an export with a (placeholder) engines section."""
    from bgevl.serving.configs import parse_pbtxt
    from bgevl.serving.repository import write_repository

    directory = tmp_path / "export"
    shutil.copytree(export_dir("fp16"), directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    (directory / "tensorrt").mkdir()
    manifest["engines"] = {}
    for name in ("vision", "text"):
        (directory / "tensorrt" / f"{name}.plan").write_bytes(b"placeholder")
        spec = manifest["graphs"][name]["inputs"][0]
        max_shape = [16] + [a if isinstance(a, int) else 77 for a in spec["shape"][1:]]
        manifest["engines"][name] = {"file": f"tensorrt/{name}.plan", "sidecar": f"tensorrt/{name}.plan.json",
                                     "tensorrt_version": "10.7.0", "gpu": "placeholder", "compute_capability": "9.0",
                                     "profiles": {spec["name"]: {"min": [1], "opt": [4], "max": max_shape}},
                                     "precision_plan": "placeholder"}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    repo = write_repository(directory, tmp_path / "repo", backend="tensorrt", sink=None)
    for name in ("vision", "text"):
        config = parse_pbtxt((repo / f"bgevl_{name}" / "config.pbtxt").read_text())
        assert config.platform == "tensorrt_plan" and config.max_batch_size == 16
        assert list(config.dynamic_batching.preferred_batch_size) == [4, 16]
        assert config.instance_group[0].kind == config.instance_group[0].KIND_GPU
        assert (repo / f"bgevl_{name}/1/model.plan").read_bytes() == b"placeholder"


# --- on a CUDA machine with TensorRT ----------------------------------------------------

def _needs_tensorrt():
    usable, why = tensorrt_status()
    if not usable:
        pytest.skip(f"needs TensorRT and a CUDA device: {why}")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_engines_build_validate_and_run_behind_the_embedder(tmp_path, precision):
    _needs_tensorrt()
    out = tmp_path / precision
    result = _cli("--model", "tiny", "--precision", precision, "--output", str(out), "--format", "tensorrt")
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = read_manifest(out)
    assert set(manifest.engines) == {"vision", "text"} and manifest.engine_validation.passed
    sidecar = read_sidecar(out / "tensorrt" / "vision.plan")
    assert sidecar["precision"] == precision and sidecar["compute_capability"]
    engine = Embedder.load(out, backend="tensorrt")
    onnx = Embedder.load(out, provider="cpu")
    texts, images = ["a red car", "two dogs on a beach"], [np.full((32, 48, 3), 200, np.uint8)]
    from PIL import Image

    images = [Image.fromarray(a) for a in images]
    threshold = {"fp16": 0.999, "int8": 0.99}[precision]
    for kw in ({"text": texts}, {"images": images}, {"images": images * 2, "text": texts}):
        a, b = engine.encode(**kw), onnx.encode(**kw)
        assert np.min(np.sum(a * b, axis=1)) >= threshold
    vision = engine.vision
    before = vision.buffers.reallocations
    engine.encode(images=images), engine.encode(images=images)
    assert vision.buffers.reallocations == before  # repeated shapes reuse the device buffers

    sidecar["tensorrt_version"] = "0.0.1"
    (out / "tensorrt" / "vision.plan.json").write_text(json.dumps(sidecar))
    with pytest.raises(BgevlError, match="built for TensorRT 0.0.1.*rebuild"):
        Embedder.load(out, backend="tensorrt")


@pytest.mark.gpu
def test_onnxruntime_cuda_and_tensorrt_providers(export_dir, tmp_path):
    import onnxruntime as ort

    available = ort.get_available_providers()
    for provider in ("cuda", "tensorrt"):
        name = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}[provider]
        if name not in available:
            pytest.skip(f"onnxruntime has no {name} here (pip install onnxruntime-gpu)")
        emb = Embedder.load(export_dir("fp16"), provider=provider, engine_cache_dir=tmp_path / "cache")
        assert emb.providers[0] == name
        ref = Embedder.load(export_dir("fp16"), provider="cpu")
        assert np.min(np.sum(emb.encode(text=["a cat"]) * ref.encode(text=["a cat"]), axis=1)) >= 0.999
