"""Every backend checks a graph's direct inputs the same way (``GraphSpec.check_feed``): token ids within
the vocabulary, no negative ids, a mask of 0 and 1, the sequence within its served range, dtypes and
ranks. Before this check ONNX Runtime answered negative ids with an embedding (its Gather takes them as
Python-style indices) and a CLIP sequence over 77 tokens with a 500, and OpenVINO answered ids past the
vocabulary with a wrong embedding and 100,000-token sequences after tens of seconds of CPU."""

from __future__ import annotations

import numpy as np
import pytest

from bgevl.core.errors import InputError
from bgevl.core.manifest import read_manifest
from bgevl.runtime.runners import open_runners
from bgevl.core.specs import INPUT_IDS, Dim, GraphSpec

BACKENDS = ["onnxruntime", pytest.param("openvino", marks=pytest.mark.skipif(
    pytest.importorskip("importlib").util.find_spec("openvino") is None,
    reason="needs the openvino extra: pip install '.[openvino]'"))]
#: (model, its graph that takes token ids)
TEXT_GRAPHS = [("tiny", "text"), ("tiny-visualized", "text"), ("tiny-mllm", "mllm_language")]


def valid_feed(spec: GraphSpec, sequence: int = 5) -> dict[str, np.ndarray]:
    """A feed the graph was declared for: one item of ``sequence`` tokens, every token id 1, a full mask,
    text positions only and an all-zero image-feature table (the MLLM's text-only form)."""
    feed = {}
    for tensor in spec.inputs:
        shape = tuple(sequence if isinstance(d, Dim) and d.name == "sequence" else
                      d.min if isinstance(d, Dim) else d for d in tensor.shape)
        fill = -1 if tensor.name == "image_feature_index" else 0 if tensor.dtype.startswith("float") else 1
        feed[tensor.name] = np.full(shape, fill, dtype=tensor.dtype)
    return feed


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model,graph", TEXT_GRAPHS)
def test_every_backend_refuses_what_the_graph_was_not_declared_for(export_dir, model, graph, backend):
    manifest = read_manifest(export_dir("fp32", model=model))
    spec = manifest.graph_spec(graph)
    vocab_top = spec.input(INPUT_IDS).values[1]
    sequence = spec.input(INPUT_IDS).shape[1]
    runner = open_runners(manifest, backend=backend, openvino_precision="f32")[graph]
    outputs = spec.output_names[:1]

    out = runner.run(valid_feed(spec), outputs)[outputs[0]]
    assert out.shape[0] == 1 and np.isfinite(out).all()

    def refused(feed, message):
        with pytest.raises(InputError, match=message) as info:
            runner.run(feed, outputs)
        assert "\n" not in str(info.value) and f"graph {graph!r}" in str(info.value)

    feed = valid_feed(spec)
    feed[INPUT_IDS][0, 1] = vocab_top + 1
    refused(feed, f"input 'input_ids': value {vocab_top + 1} is outside 0..{vocab_top}")
    feed[INPUT_IDS][0, 1] = 10**12
    refused(feed, f"value {10**12} is outside 0..{vocab_top}")
    feed[INPUT_IDS][0, 1] = -3
    refused(feed, f"value -3 is outside 0..{vocab_top}")
    feed = valid_feed(spec)
    feed["attention_mask"][0, 0] = 2
    refused(feed, "input 'attention_mask': value 2 is outside 0..1")
    refused(valid_feed(spec, sequence.max + 1),
            f"input 'input_ids': sequence {sequence.max + 1} is outside the served range 1..{sequence.max}")
    feed = valid_feed(spec)
    feed[INPUT_IDS] = feed[INPUT_IDS].astype(np.int32)
    refused(feed, "input 'input_ids': dtype int32, expected int64")
    feed = valid_feed(spec)
    feed["attention_mask"] = feed["attention_mask"][:, :-1]
    refused(feed, "input 'attention_mask': sequence 4 differs from 'input_ids''s 5")
    feed = valid_feed(spec)
    del feed["attention_mask"]
    refused(feed, "missing input\\(s\\) attention_mask")
    # after every refusal the runner still serves
    assert np.allclose(runner.run(valid_feed(spec), outputs)[outputs[0]], out, atol=1e-6)


def test_the_declaration_travels_in_the_manifest_and_old_manifests_still_load(export_dir):
    spec = read_manifest(export_dir("fp32")).graph_spec("text")
    ids = spec.input(INPUT_IDS)
    assert ids.values is not None and ids.values[0] == 0 and spec.input("attention_mask").values == (0, 1)
    data = spec.to_json()
    for tensor in data["inputs"]:
        tensor.pop("values", None)  # a manifest written before the ranges were declared
    old = GraphSpec.from_json(data)
    assert old.input(INPUT_IDS).values is None
    feed = valid_feed(old)
    feed[INPUT_IDS][0, 0] = 10**6  # no declared range: left to the backend
    old.check_feed(feed)
    with pytest.raises(InputError, match="sequence 78 is outside the served range 1..77"):
        old.check_feed(valid_feed(old, 78))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_pixels_sent_straight_to_a_vision_graph_are_refused(export_dir, backend):
    """NaN pixels sent to the vision encoder directly gave a NaN embedding with a 200."""
    manifest = read_manifest(export_dir("fp32"))
    spec = manifest.graph_spec("vision")
    runner = open_runners(manifest, backend=backend, openvino_precision="f32")["vision"]
    feed = valid_feed(spec)
    assert np.isfinite(runner.run(feed, ["image_embeds"])["image_embeds"]).all()
    for bad in (np.nan, np.inf, -np.inf):
        feed["pixel_values"][0, 0, 0, :3] = bad
        with pytest.raises(InputError, match=r"graph 'vision' input 'pixel_values': 3 non-finite value\(s\)"):
            runner.run(feed, ["image_embeds"])
