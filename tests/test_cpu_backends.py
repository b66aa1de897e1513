"""The CPU backends beside ONNX Runtime fp32 (issue: CPU serving at the hardware limit): OpenVINO bf16/f32
behind Embedder, Triton and bgevl-bench, gated by parity; the uint8-activation int8 form; the benchmark's
paired ratios, analytic FLOPs and plain-allocator baseline. These check that the backends run, validate
and report; the speed itself is in benchmarks/results/."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bgevl.core.errors import BgevlError, ValidationFailed
from bgevl.core.manifest import read_manifest
from bgevl.core.probes import probe_set
from bgevl.runtime import Embedder

openvino = pytest.importorskip("openvino", reason="needs the openvino extra: pip install '.[openvino]'")

from bgevl.runtime.openvino import cpu_has_bf16, open_openvino, runners_figures  # noqa: E402

#: bf16 where this CPU computes it (AVX512-BF16 / AMX), else OpenVINO's f32
PRECISION = "bf16" if cpu_has_bf16() else "f32"


def _cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("model", ["tiny", "tiny-mllm", "tiny-visualized"])
def test_openvino_runs_every_family_and_matches_onnxruntime(export_dir, model):
    export = export_dir("fp32", model=model)
    served = Embedder.load(export, backend="openvino", openvino_precision=PRECISION)
    direct = Embedder.load(export, provider="cpu")
    assert all(r.providers[0].startswith("OpenVINO ") and f"({PRECISION})" in r.providers[0] for r in served.runners.values())
    probes = probe_set(3)
    for kwargs in (dict(images=probes.images), dict(text=probes.texts), dict(images=probes.images, text=probes.texts)):
        assert _cosines(served.encode(**kwargs), direct.encode(**kwargs)).min() >= 0.9999


def test_the_parity_gate_refuses_what_misses_it(export_dir):
    manifest = read_manifest(export_dir("fp32"))
    runners = open_openvino(manifest, precision=PRECISION)  # passes the 0.9999 gate
    figures = runners_figures(manifest, runners, 0.9999)
    assert set(figures) == {"image", "text", "composed"} and min(f["min_cosine"] for f in figures.values()) >= 0.9999
    with pytest.raises(ValidationFailed, match=r"OpenVINO .* misses the parity gate \(min cosine [01]\.\d+ < 1\.01\)"):
        runners_figures(manifest, runners, 1.01)


def test_python_openvino_encoders_serve_on_the_bundled_triton(export_dir, tmp_path):
    pytest.importorskip("tritonclient.http", reason="needs the serving extra: pip install '.[serving]'")
    import io

    import tritonclient.http as httpclient

    from bgevl.serving.configs import parse_pbtxt
    from bgevl.serving.repository import write_repository
    from bgevl.serving.server import TritonServer

    export = export_dir("fp32")
    full = write_repository(export, tmp_path / "full", backend="openvino", sink=None)
    config = parse_pbtxt((full / "bgevl_vision" / "config.pbtxt").read_text())  # Triton's protobuf schema
    assert config.backend == "openvino" and config.default_model_filename == "vision.onnx"
    assert config.parameters["HINT_BF16"].string_value == "YES" and config.max_batch_size == 64
    with pytest.raises(BgevlError, match="the bundled CPU server|has only the python backend"):
        TritonServer(full, http_port=None, grpc_port=None, metrics_port=None).start()

    repo = write_repository(export, tmp_path / "repo", backend="python-openvino", openvino_precision=PRECISION, sink=None)
    assert parse_pbtxt((repo / "bgevl_vision" / "config.pbtxt").read_text()).parameters["engine"].string_value == "openvino"
    server = TritonServer(repo, http_port=None, grpc_port=None, metrics_port=None).start()
    try:
        client = httpclient.InferenceServerClient(server.http_url)
        images = []
        for image in probe_set(2).images:
            buf = io.BytesIO()
            image.save(buf, "PNG")
            images.append(buf.getvalue())
        tensor = httpclient.InferInput("IMAGE", [2, 1], "BYTES")
        tensor.set_data_from_numpy(np.array(images, dtype=object).reshape(-1, 1))
        served = client.infer("bgevl", [tensor]).as_numpy("EMBEDDING")
        assert _cosines(served, Embedder.load(export, provider="cpu").encode(images=images)).min() >= 0.9999
        # straight to the OpenVINO text encoder: ids past the vocabulary, negative ids and overlong
        # sequences are 400s naming the problem (OpenVINO itself answered them with wrong embeddings)
        from tritonclient.utils import InferenceServerException

        for ids, message in (([[49406, 99999, 49407]], "value 99999 is outside 0.."),
                             ([[49406, 10**12, 49407]], f"value {10**12} is outside 0.."),
                             ([[49406, -5, 49407]], "value -5 is outside 0.."),
                             ([[1] * 600], "sequence 600 is outside the served range 1..77")):
            ids = np.array(ids, dtype=np.int64)
            inputs = []
            for name, value in (("input_ids", ids), ("attention_mask", np.ones_like(ids))):
                tensor = httpclient.InferInput(name, list(value.shape), "INT64")
                tensor.set_data_from_numpy(value)
                inputs.append(tensor)
            with pytest.raises(InferenceServerException, match=message) as info:
                client.infer("bgevl_text", inputs)
            assert info.value.status() == "400" and "bgevl_text:" in str(info.value)
    finally:
        server.stop()


def test_the_uint8_int8_form_validates_and_is_recorded(export_dir, tmp_path):
    from bgevl.export import ExportOptions, run_export
    from bgevl.graphs.engines import precision_plan

    out = export_dir("int8", int8_mode="qdq-u8")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["validation"]["passed"] and manifest["int8_mode"] == "qdq-u8"
    assert {g["precision_details"]["int8_form"] for g in manifest["graphs"].values()} == {"static-qdq-u8"}
    assert all(g["precision_details"]["activations"] == "uint8 asymmetric per-tensor" for g in manifest["graphs"].values())
    with pytest.raises(BgevlError, match="'static-qdq-u8' .* which TensorRT does not build"):
        precision_plan("int8", "static-qdq-u8")
    with pytest.raises(BgevlError, match="--int8-mode qdq-u8: the MLLM's int8 is weight-only"):
        run_export(ExportOptions(output=tmp_path / "mllm", model="tiny-mllm", precision="int8", int8_mode="qdq-u8"),
                   sink=lambda m: None)
    assert not (tmp_path / "mllm").exists()


def test_flops_are_counted_on_the_graphs_attention_included(export_dir):
    """The tiny CLIP's vision graph: 24*N*C^2 + 4*N^2*C per layer (N = 50 tokens, C = 32, 2 layers), the
    32-px patch convolution and the projection of the CLS token."""
    from bgevl.benchmarks.flops import graph_cost

    manifest = read_manifest(export_dir("fp32"))
    n, c = 50, 32
    expected = 2 * (24 * n * c * c + 4 * n * n * c) + 2 * 49 * (3 * 32 * 32) * 32 + 2 * 32 * 16
    flops, outputs = graph_cost(manifest.graph_path("vision"), {"pixel_values": np.zeros((1, 3, 224, 224), np.float32)},
                                ["image_embeds"])
    assert flops == expected and outputs["image_embeds"].shape == (1, 16)


def test_bench_reports_paired_ratios_both_pytorch_baselines_and_the_pareto_front(tmp_path):
    from bgevl.benchmarks.cli import main

    out = tmp_path / "bench"
    assert main(["--models", "tiny", "--backends", "pytorch,pytorch-plain,onnxruntime-fp32,openvino-bf16,onnxruntime-int8-u8",
                 "--workloads", "image", "--batch-sizes", "2", "--warmup", "1", "--min-repeats", "6", "--min-seconds", "0",
                 "--peak-sizes", "256,512", "--output", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    rows = {r["backend"]: r for r in data["results"]}
    expected = {"pytorch", "pytorch-plain", "onnxruntime-fp32", "onnxruntime-int8-u8"} | (
        {"openvino-bf16"} if cpu_has_bf16() else set())
    assert set(rows) == expected
    assert "mallopt" in data["hardware"]["allocator"]
    for name, row in rows.items():
        assert row["repetitions"] >= 6 and row["gflop_per_call"] > 0
        assert set(row["paired"]) == {"pytorch", "pytorch-plain", "onnxruntime-fp32"} - {name}
        ratio = row["paired"]["pytorch"] if name != "pytorch" else row["paired"]["onnxruntime-fp32"]
        assert ratio["p10"] <= ratio["median"] <= ratio["p90"] and 0 <= ratio["won"] <= 1 and ratio["rounds"] >= 6
        assert row["min_cosine_vs_pytorch"] > 0.99
    report = (out / "report.md").read_text()
    assert "Paired per-round ratios" in report and "Pareto" in report and "pytorch-plain" in report
