"""Triton configs built from the graph declarations, parsed back against Triton's ModelConfig schema.

Covers the onnxruntime and tensorrt variants that the CPU server bundled here cannot load.
"""

from __future__ import annotations

import pytest

from bgevl.families.clip.graphs import clip_graph_specs
from bgevl.families.mllm.graphs import mllm_graph_specs
from bgevl.core.specs import TensorSpec
from bgevl.serving.configs import (
    Batching, Step, check_ensemble_wiring, encoder_config, ensemble_config, parse_pbtxt, python_config, to_pbtxt,
)

CLIP = clip_graph_specs(image_size=224, max_text_length=77, embed_dim=512, opt_batch=8, max_batch=64)
MLLM = mllm_graph_specs(tile_size=336, tile_tokens=576, hidden_size=4096, max_batch=8, opt_batch=2)


@pytest.mark.parametrize("backend,platform,filename", [("onnxruntime", "onnxruntime_onnx", "model.onnx"),
                                                       ("tensorrt", "tensorrt_plan", "model.plan"),
                                                       ("python", "", "")])
@pytest.mark.parametrize("graph", [CLIP["vision"], CLIP["text"], MLLM["mllm_vision"], MLLM["mllm_language"]],
                         ids=lambda g: g.name)
def test_encoder_configs_parse_and_follow_the_declaration(backend, platform, filename, graph):
    batch = graph.inputs[0].shape[0]
    text = to_pbtxt(encoder_config(f"bgevl_{graph.name}", graph, backend, Batching.from_dim(batch)))
    config = parse_pbtxt(text)
    assert config.platform == platform and config.default_model_filename == filename
    assert config.backend == ("python" if backend == "python" else "")
    # the language graph's tile_features is indexed by tile, not by request: no Triton batching there
    batched = graph.name != "mllm_language"
    assert config.max_batch_size == (batch.max if batched else 0)
    assert list(config.dynamic_batching.preferred_batch_size) == (sorted({batch.opt, batch.max}) if batched else [])
    assert [i.name for i in config.input] == graph.input_names
    assert [o.name for o in config.output] == graph.output_names
    for declared, written in zip(graph.inputs + graph.outputs, list(config.input) + list(config.output)):
        shape = declared.shape[1:] if batched else declared.shape  # the batch axis is implicit when batched
        assert list(written.dims) == [-1 if not isinstance(d, int) else d for d in shape], declared.name
    assert "kind: KIND_CPU" in text and config.instance_group[0].count == 1


def test_bad_config_text_is_rejected_with_position():
    with pytest.raises(Exception, match=r"1:\d+"):
        parse_pbtxt('name: "x" platform: "onnxruntime_onnx" max_batch_size: "eight"')


def _clip_repository():
    batching = Batching.from_dim(CLIP["vision"].inputs[0].shape[0])
    raw = [TensorSpec("IMAGE", "bytes", (1,)), TensorSpec("TEXT", "bytes", (1,))]
    emb = TensorSpec("EMBEDDING", "float32", (512,))
    members = {
        "pre": python_config("pre", raw, CLIP["vision"].inputs + CLIP["text"].inputs, batching, optional=["IMAGE", "TEXT"]),
        "vision": encoder_config("vision", CLIP["vision"], "onnxruntime", batching),
        "text": encoder_config("text", CLIP["text"], "onnxruntime", batching),
    }
    steps = [Step("pre", {"IMAGE": "IMAGE", "TEXT": "TEXT"},
                  {"pixel_values": "pv", "input_ids": "ids", "attention_mask": "mask"}),
             Step("vision", {"pixel_values": "pv"}, {"image_embeds": "EMBEDDING"}),
             Step("text", {"input_ids": "ids", "attention_mask": "mask"}, {"text_features": "tf"})]
    return members, raw, emb, steps


def test_ensemble_wiring_is_checked():
    members, raw, emb, steps = _clip_repository()
    ensemble = parse_pbtxt(to_pbtxt(ensemble_config("bgevl", raw, [emb], steps, 64, optional=["IMAGE", "TEXT"])))
    assert ensemble.platform == "ensemble" and [i.optional for i in ensemble.input] == [True, True]
    check_ensemble_wiring(ensemble, members)
    broken = list(steps)
    broken[2] = Step("text", {"input_ids": "ids"}, {"text_features": "tf"})
    with pytest.raises(ValueError, match=r"text input\(s\) \['attention_mask'\] are not mapped"):
        check_ensemble_wiring(ensemble_config("e", raw, [emb], broken, 64), members)
    broken[2] = Step("text", {"input_ids": "ids", "attention_mask": "nowhere"}, {"text_features": "tf"})
    with pytest.raises(ValueError, match="'nowhere' feeding text is not produced"):
        check_ensemble_wiring(ensemble_config("e", raw, [emb], broken, 64), members)
    with pytest.raises(ValueError, match="output 'EMBEDDING' is produced by no step"):
        check_ensemble_wiring(ensemble_config("e", raw, [emb], steps[:1], 64), members)


def test_triton_backend_auto_writes_the_encoders_of_the_runtimes_choice(export_dir, tmp_path):
    """--triton-backend auto: the runtime's backend='auto' choice on this machine (gated and timed on the probe
    set), as the encoder backend the CPU server runs, and said with its figures."""
    from bgevl.serving.repository import AUTO_ENCODERS, repository_backends, write_repository

    said = []
    repo = write_repository(export_dir("fp32"), tmp_path / "repo", backend="auto", sink=said.append)
    line = next(m for m in said if m.startswith("--triton-backend auto: "))
    chosen = next(name for name in AUTO_ENCODERS if f"as {name} is " in line)
    backend = AUTO_ENCODERS[chosen][0]
    assert backend in ("python", "python-openvino") and f"{backend} encoders" in line
    assert "passes the parity gate on the probe set (" in line and " ms" in line
    backends = repository_backends(repo)
    assert backends["bgevl_text"] == backends["bgevl_vision"] == "python"
    encoder = (repo / "bgevl_text" / "config.pbtxt").read_text()
    assert ("openvino" in encoder) == (backend == "python-openvino")
