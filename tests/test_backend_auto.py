"""``Embedder.load(..., backend="auto")``: the fastest gate-passing form of the export, and why. The choice rule
is tested on injected timings; the loads assert what was chosen is one that passed, never which one (that
depends on the machine and its load)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from bgevl.core.errors import BgevlError, ValidationFailed
from bgevl.runtime import Embedder
from bgevl.runtime.auto import KEEP_DEFAULT_WITHIN, choose


def test_the_fastest_gate_passing_backend_is_chosen_and_the_reason_names_every_figure():
    choice = choose({"onnxruntime": 1.0, "openvino-f32": 0.5, "openvino-bf16": 0.8},
                    {"tensorrt": "no CUDA device"})
    assert choice.chosen == "openvino-f32"
    assert choice.reason == ("the fastest that passes the parity gate on the probe set (openvino-f32 500 ms, "
                             "openvino-bf16 800 ms, onnxruntime 1000 ms); not used: tensorrt (no CUDA device)")
    assert choose({"openvino-f32": 2.0}, {"onnxruntime": "misses the gate"}).chosen == "openvino-f32"


def test_onnx_runtime_is_kept_within_the_noise_margin():
    assert KEEP_DEFAULT_WITHIN == 0.05
    inside = choose({"onnxruntime": 1.04, "openvino-f32": 1.0})
    assert inside.chosen == "onnxruntime" and inside.reason.startswith("ONNX Runtime, within 5% of the fastest (openvino-f32)")
    assert choose({"onnxruntime": 1.06, "openvino-f32": 1.0}).chosen == "openvino-f32"


def test_nothing_passing_is_one_clear_error():
    with pytest.raises(BgevlError, match=r"^backend 'auto': no backend passed the parity gate here \(onnxruntime: "
                                         r"misses it\); pass a backend explicitly$"):
        choose({}, {"onnxruntime": "misses it"})


def _cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("model", ["tiny", "tiny-mllm"])  # batch-aligned probe requests, and image tiles
def test_auto_loads_a_gate_passing_backend_and_says_which(export_dir, caplog, model):
    export = export_dir("fp32", model=model)
    with caplog.at_level(logging.INFO, logger="bgevl"):
        embedder = Embedder.load(export, backend="auto", threads=1)
    choice = embedder.backend_choice
    assert embedder.backend == choice.chosen and choice.chosen in choice.seconds  # timed, so it passed its gate
    assert "onnxruntime" in choice.seconds  # the fp32 export passes its own gate on ONNX Runtime
    assert set(choice.seconds).isdisjoint(choice.refused)
    assert any(f"backend 'auto' for {export.name}: {choice.chosen}, {choice.reason}" == r.getMessage() for r in caplog.records)
    direct = Embedder.load(export, provider="cpu")
    assert direct.backend == "onnxruntime" and direct.backend_choice is None
    texts = ["a red square", "two dogs on a beach"]
    assert _cosines(embedder.encode(text=texts), direct.encode(text=texts)).min() >= 0.9999


def test_auto_leaves_out_what_misses_its_gate(export_dir, monkeypatch):
    from bgevl.runtime import auto

    gate = auto._gate

    def refuse_onnxruntime(manifest, runners, candidate):
        if candidate.name == "onnxruntime":
            raise ValidationFailed("CPUExecutionProvider on x misses the parity gate (min cosine 0.5 < 0.99999):")
        gate(manifest, runners, candidate)

    monkeypatch.setattr(auto, "_gate", refuse_onnxruntime)
    monkeypatch.setattr(auto, "candidates", lambda manifest: [auto.Candidate("onnxruntime", "onnxruntime"),
                                                              auto.Candidate("openvino-f32", "openvino",
                                                                             {"openvino_precision": "f32"})])
    pytest.importorskip("openvino", reason="needs the openvino extra: pip install '.[openvino]'")
    embedder = Embedder.load(export_dir("fp32"), backend="auto", threads=1)
    assert embedder.backend == "openvino-f32"
    assert embedder.backend_choice.refused == {
        "onnxruntime": "CPUExecutionProvider on x misses the parity gate (min cosine 0.5 < 0.99999):"}
    assert embedder.runners["text"].providers[0].startswith("OpenVINO ")


def test_auto_closes_the_candidates_it_does_not_keep_and_an_embedder_closes_its_runners(export_dir, monkeypatch):
    """The losers' sessions and compiled models are freed when the choice is made, not when the garbage collector
    gets to them; ``with Embedder.load(...)`` frees the chosen ones at the end of the block."""
    pytest.importorskip("openvino", reason="needs the openvino extra: pip install '.[openvino]'")
    from bgevl.runtime import auto, runners

    closed: list[str] = []
    close = runners.close_runners

    def recording(opened):
        closed.extend(type(r).__name__ for r in opened.values())
        close(opened)

    monkeypatch.setattr(runners, "close_runners", recording)
    monkeypatch.setattr(auto, "candidates", lambda manifest: [auto.Candidate("onnxruntime", "onnxruntime"),
                                                              auto.Candidate("openvino-f32", "openvino",
                                                                             {"openvino_precision": "f32"})])
    monkeypatch.setattr(auto, "choose", lambda seconds, refused=None: auto.BackendChoice("openvino-f32", "forced",
                                                                                          dict(seconds)))
    with Embedder.load(export_dir("fp32"), backend="auto", threads=1) as embedder:
        assert closed == ["OnnxRunner", "OnnxRunner"]  # the loser's two graphs, as soon as it lost
        kept = dict(embedder.runners)
        assert embedder.encode(text=["a red square"]).shape == (1, 16)
    assert closed[2:] == ["OpenVinoRunner", "OpenVinoRunner"] and embedder.runners == {}
    assert all(r.compiled is None for r in kept.values())
    with pytest.raises(BgevlError, match="was closed; load it again"):
        embedder.encode(text=["a red square"])
