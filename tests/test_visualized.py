"""Visualized-BGE (the third model family): the published .pth layout, the checked loader, the
independent reference, parity of the exports at every precision for the BERT and XLM-R variants,
input rules, and a real Triton server."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bgevl.core.errors import CheckpointError, InputError
from bgevl.core.registry import get_family, get_model_spec
from bgevl.families.visualized.checkpoint import expected_keys, generate_visualized_checkpoint, load_visualized
from bgevl.families.visualized.modeling import EvaVisionConfig
from bgevl.families.visualized.reference import OriginalVisualized
from bgevl.runtime import Embedder
from bgevl.core.specs import COSINE_THRESHOLDS

VARIANTS = ("tiny-visualized", "tiny-visualized-m3")
TEXTS = ["a red car parked by the sea", "two dogs on a beach", "make the background dark and the car blue"]


def _image(seed: int, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    return image.convert(mode) if mode != "P" else image.quantize(64)


#: sizes with an odd crop excess (torchvision's round vs //), upscaling, a palette and an RGBA image
IMAGES = [_image(1, (300, 227)), _image(2, (100, 180), "P"), _image(3, (240, 240), "RGBA")]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The generated checkpoints (the same seed as the exports' own)."""
    root = tmp_path_factory.mktemp("visualized")
    return {key: generate_visualized_checkpoint(get_model_spec(key), root / key) for key in VARIANTS}


@pytest.fixture(scope="module")
def originals(checkpoints):
    return {key: OriginalVisualized(path) for key, path in checkpoints.items()}


# --- the published layout --------------------------------------------------------------------

def test_generated_checkpoint_is_in_the_published_layout(checkpoints):
    from transformers import AutoConfig

    for key, directory in checkpoints.items():
        (pth,) = directory.glob("*.pth")
        state = torch.load(pth, map_location="cpu", weights_only=True)  # plain fp16 tensors, no code
        spec = get_model_spec(key)
        expected = expected_keys(EvaVisionConfig(**spec.architecture["vision"]), AutoConfig.from_pretrained(directory))
        assert list(state) == list(expected)
        assert all(tuple(t.shape) == expected[k] and t.dtype == torch.float16 for k, t in state.items())
        rope = [t for k, t in state.items() if k.endswith("rope.freqs_cos")]
        assert len(rope) == 1 + spec.architecture["vision"]["layers"]
        assert len({t.data_ptr() for t in rope}) == 1  # one stored tensor, as torch.save stores FE's shared module


def test_the_real_models_key_counts_match_the_published_files():
    from transformers import BertConfig, XLMRobertaConfig

    base, m3 = get_model_spec("visualized-base").architecture, get_model_spec("visualized-m3").architecture
    base_keys = expected_keys(EvaVisionConfig(**base["vision"]), BertConfig(**base["text"]))
    m3_keys = expected_keys(EvaVisionConfig(**m3["vision"]), XLMRobertaConfig(**m3["text"]))
    assert len(base_keys) == 488 and len(m3_keys) == 956
    assert base_keys["model_visual.visual.rope.freqs_cos"] == (196, 64) and m3_keys["model_visual.visual.rope.freqs_cos"] == (256, 64)
    assert m3_keys["model_visual.visual.blocks.0.mlp.w1.weight"] == (2730, 1024)
    assert m3_keys["bge_embeddings.position_embeddings.weight"] == (8194, 1024)


def test_the_modules_load_the_published_layout_strictly(checkpoints):
    """``modeling`` (what the export traces) names its tensors as the file does, independently listed."""
    model, tokenizer = load_visualized(checkpoints["tiny-visualized"])
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoints["tiny-visualized"])
    assert set(model.state_dict()) == set(expected_keys(model.vision_config, config))
    assert tokenizer("")["input_ids"] == [tokenizer.cls_token_id, tokenizer.sep_token_id]


# --- refusals ----------------------------------------------------------------------------------

def _copy(directory: Path, tmp_path: Path, edit=None) -> Path:
    import shutil

    out = tmp_path / "ckpt"
    shutil.copytree(directory, out)
    if edit is not None:
        (pth,) = out.glob("*.pth")
        state = torch.load(pth, weights_only=True)
        edit(state, pth)
    return out


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/bgevl-visualized-pwned",))


def _save(state, pth):
    torch.save(state, pth)


@pytest.mark.parametrize("case,edit,message", [
    ("missing tensor", lambda s, p: (s.pop("visual_proj.bias"), _save(s, p)), r"1 missing \(visual_proj.bias\)"),
    ("unexpected tensor", lambda s, p: (s.__setitem__("extra.weight", torch.zeros(2)), _save(s, p)), r"1 unexpected \(extra.weight\)"),
    ("wrong shape", lambda s, p: (s.__setitem__("visual_proj.bias", torch.zeros(3, dtype=torch.float16)), _save(s, p)),
     r"tensors of the wrong shape \(visual_proj.bias \(3,\)"),
    ("rope copies differ", lambda s, p: (s.__setitem__("model_visual.visual.blocks.0.attn.rope.freqs_cos",
                                                       s["model_visual.visual.rope.freqs_cos"] + 1), _save(s, p)),
     "rotary tables freqs_cos differ"),
    ("truncated", lambda s, p: p.write_bytes(p.read_bytes()[:5000]), "not a loadable weights-only state dict"),
    ("pickled code", lambda s, p: p.write_bytes(pickle.dumps({"x": _RunsCode()})), "not a loadable weights-only state dict"),
])
def test_broken_checkpoints_are_refused_in_one_line_with_nothing_written(checkpoints, tmp_path, case, edit, message):
    from bgevl.export import ExportOptions, run_export

    marker = Path("/tmp/bgevl-visualized-pwned")
    marker.unlink(missing_ok=True)
    path = _copy(checkpoints["tiny-visualized"], tmp_path, edit)
    with pytest.raises(CheckpointError, match=message) as info:
        run_export(ExportOptions(output=tmp_path / "out", model="tiny-visualized", model_path=path), sink=lambda m: None)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists() and not marker.exists()


def test_model_path_forms_and_their_refusals(checkpoints, tmp_path):
    family = get_family("visualized")
    directory = checkpoints["tiny-visualized"]
    (pth,) = directory.glob("*.pth")
    by_dir, _ = family.load(directory)
    by_file, _ = family.load(pth)  # the .pth with the text model's files beside it
    assert all(torch.equal(a, b) for a, b in zip(by_dir.state_dict().values(), by_file.state_dict().values()))
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / pth.name).write_bytes(pth.read_bytes())
    with pytest.raises(CheckpointError, match="no text-model config.json and tokenizer files beside it"):
        family.local_checkpoint(alone / pth.name)
    with pytest.raises(CheckpointError, match="no text-model config.json and tokenizer files beside"):
        family.local_checkpoint(alone)
    (alone / "second.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="2 .pth files there"):
        family.local_checkpoint(alone)
    wrong = _copy(directory, tmp_path)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "model_type": "clip"}))
    with pytest.raises(CheckpointError, match="a 'clip' config; Visualized-BGE's text model is BERT"):
        family.load(wrong)
    with pytest.raises(CheckpointError, match="is not BAAI/bge-visualized Visualized_base_en_v1.5.pth: vision width 64"):
        family.load(directory, get_model_spec("visualized-base"))


def test_bgevl_export_check_reports_a_checkpoint_and_refuses_a_broken_one(checkpoints, tmp_path):
    ok = subprocess.run([sys.executable, "-m", "bgevl.export.cli", "check", "--model", "tiny-visualized", "--model-path",
                         str(checkpoints["tiny-visualized"])], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "read with weights_only=True" in ok.stdout and "finite and distinct" in ok.stdout
    broken = _copy(checkpoints["tiny-visualized"], tmp_path, lambda s, p: (s.pop("visual_proj.bias"), _save(s, p)))
    bad = subprocess.run([sys.executable, "-m", "bgevl.export.cli", "check", "--model", "tiny-visualized", "--model-path",
                          str(broken)], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1 and "visual_proj.bias" in bad.stderr


# --- the reference is the original's computation -------------------------------------------------

@pytest.mark.parametrize("key,model_class", [("tiny-visualized", "BertModel"), ("tiny-visualized-m3", "XLMRobertaModel")])
def test_the_reference_text_path_is_the_plain_text_model(checkpoints, originals, key, model_class):
    """FE's encode_text is the text model with its own position ids (XLM-R: from the padding index + 1);
    transformers' full model on the same tensors is an independent check of the reference."""
    import transformers

    directory = checkpoints[key]
    (pth,) = directory.glob("*.pth")
    state = torch.load(pth, weights_only=True)
    config = transformers.AutoConfig.from_pretrained(directory)
    model = getattr(transformers, model_class)(config, add_pooling_layer=False).eval()
    renamed = {k.replace("bge_encoder.", "encoder.").replace("bge_embeddings.", "embeddings."): v.float()
               for k, v in state.items() if k.startswith(("bge_encoder.", "bge_embeddings."))}
    model.load_state_dict(renamed, strict=True)
    tokens = originals[key].model.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        cls = model(**tokens).last_hidden_state[:, 0]
    expected = torch.nn.functional.normalize(cls, dim=-1).numpy()
    got = originals[key].encode(text=TEXTS)
    assert np.abs(got - expected).max() < 1e-5
    assert tokens["attention_mask"].sum(1).min() < tokens["attention_mask"].shape[1]  # padding was exercised


def test_the_reference_rotates_patch_tokens_only(originals):
    reference = originals["tiny-visualized"].model
    reference.rope_calls.clear()
    originals["tiny-visualized"].encode(images=IMAGES[:1])
    assert reference.rope_calls and all(shape[2] == 196 for shape in reference.rope_calls)  # 196 patches, no CLS


def test_the_image_transform_crops_with_torchvisions_rounding():
    """A 224x227 image (after the resize) crops from row round(1.5) = 2; transformers' CLIP processor would
    take row 1. RGB after the crop: a palette image keeps Pillow's palette resize."""
    from bgevl.families.visualized.preprocessing import center_crop_box, pixel_values, resized_size

    assert resized_size(300, 227, 224) == (296, 224) and resized_size(100, 180, 224) == (224, 403)
    assert center_crop_box(224, 227, 224) == (0, 2, 224, 226) and center_crop_box(224, 229, 224) == (0, 2, 224, 226)
    rows = np.repeat(np.arange(227, dtype=np.uint8)[:, None, None], 224, axis=1).repeat(3, axis=2)
    out = pixel_values(Image.fromarray(rows), 224)
    assert np.allclose(out[0, 0, 0] * 0.26862954 + 0.48145466, 2 / 255, atol=1e-6)


# --- parity of the exports ---------------------------------------------------------------------------

@pytest.mark.parametrize("key", VARIANTS)
@pytest.mark.parametrize("precision,int8_mode", [("fp32", "qdq"), ("fp16", "qdq"), ("int8", "qdq"), ("int8", "dynamic")])
def test_exports_match_the_original(export_dir, originals, key, precision, int8_mode):
    out = export_dir(precision, model=key, int8_mode=int8_mode)
    manifest = json.loads((out / "manifest.json").read_text())
    threshold = COSINE_THRESHOLDS[precision]
    assert manifest["validation"]["passed"] is True
    assert set(manifest["validation"]["figures"]) == {"image", "text", "composed"}
    for figures in manifest["validation"]["figures"].values():
        assert figures["min_cosine"] >= threshold
    # new inputs, not the probe set: odd crops, a palette and an RGBA image, padded texts
    embedder, original = Embedder.load(out, provider="cpu"), originals[key]
    for kwargs in (dict(images=IMAGES), dict(text=TEXTS), dict(images=IMAGES, text=TEXTS)):
        got, want = embedder.encode(**kwargs), original.encode(kwargs.get("images"), kwargs.get("text"))
        assert got.shape == want.shape == (3, manifest["model"]["embedding_dim"])
        assert _cosines(got, want).min() >= threshold, (kwargs.keys(), _cosines(got, want))
    if precision == "fp16":
        import onnx

        vision = onnx.load(str(out / "vision.onnx"))
        tables = [i for i in vision.graph.initializer if ".rope.freqs_" in i.name]
        assert tables and all(i.data_type == onnx.TensorProto.FLOAT for i in tables)
        assert "2D rotary (cos/sin tables)" in manifest["graphs"]["vision"]["precision_details"]["kept_float32"]
    if precision == "int8":
        form = "dynamic" if int8_mode == "dynamic" else "weight-only-qdq"
        assert {g["precision_details"]["int8_form"] for g in manifest["graphs"].values()} == {form}


def test_text_limits_are_refused_or_truncated_and_say_which(export_dir, caplog):
    out = export_dir("fp32", model="tiny-visualized")
    manifest = json.loads((out / "manifest.json").read_text())
    layout = manifest["recipe"]["text_layout"]
    assert (layout["image_tokens"], layout["max_position_embeddings"]) == (196, 512)
    long_text = " ".join(["red"] * 400)  # 402 tokens with [CLS]/[SEP]
    refusing = Embedder.load(out, provider="cpu")
    assert refusing.encode(text=[" ".join(["red"] * 500)]).shape == (1, 64)  # 502 tokens alone: within 512
    with pytest.raises(InputError, match=r"text\[0\] \(402 tokens\) over the limit of 316 tokens for a text beside the "
                                         r"image tokens.*text_overflow='truncate'"):
        refusing.encode(images=IMAGES[:1], text=[long_text])
    truncating = Embedder.load(out, provider="cpu", text_overflow="truncate")
    with caplog.at_level("WARNING", logger="bgevl"):
        got = truncating.encode(images=IMAGES[:1], text=[long_text])
    assert "truncating text[0] (402 tokens) to the limit of 316" in caplog.text
    # the truncated text is the first 315 tokens + [SEP], what FE would embed given that text
    tokenizer = truncating.preprocessor.tokenizer
    ids = tokenizer([long_text], truncation=True, max_length=316)["input_ids"][0]
    assert len(ids) == 316 and ids[-1] == tokenizer.sep_token_id
    assert np.isfinite(got).all()


def test_requests_of_mixed_kinds_and_instructions_are_refused(export_dir):
    embedder = Embedder.load(export_dir("fp32", model="tiny-visualized"), provider="cpu")
    with pytest.raises(InputError, match="takes no task instruction"):
        embedder.encode(text=TEXTS, role="query", instruction="Retrieve images")
    with pytest.raises(InputError, match=r"images\[1\] is None: a request is all images, all texts or all"):
        embedder.encode(images=[IMAGES[0], None], text=TEXTS[:2])


# --- Triton ------------------------------------------------------------------------------------------

def test_a_triton_server_serves_what_the_runtime_computes(export_dir, tmp_path):
    pytest.importorskip("tritonclient.http", reason="needs the serving extra: pip install '.[serving]'")
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from bgevl.serving.repository import write_repository
    from bgevl.serving.server import TritonServer

    def png(image: Image.Image) -> bytes:
        buf = io.BytesIO()
        image.save(buf, "PNG")
        return buf.getvalue()

    def inputs(images=None, texts=None):
        out = []
        for name, values in (("IMAGE", images), ("TEXT", [t.encode() for t in texts] if texts else None)):
            if values is not None:
                tensor = httpclient.InferInput(name, [len(values), 1], "BYTES")
                tensor.set_data_from_numpy(np.array(values, dtype=object).reshape(-1, 1))
                out.append(tensor)
        return out

    export = export_dir("fp32", model="tiny-visualized-m3")
    embedder = Embedder.load(export, provider="cpu")
    server = TritonServer(write_repository(export, tmp_path / "repo", sink=None), http_port=None, grpc_port=None,
                          metrics_port=None).start()
    try:
        client = httpclient.InferenceServerClient(server.http_url)
        images = [png(im) for im in IMAGES]
        for kwargs in (dict(images=images), dict(texts=TEXTS), dict(images=images, texts=TEXTS)):
            served = client.infer("bgevl", inputs(**kwargs)).as_numpy("EMBEDDING")
            direct = embedder.encode(images=kwargs.get("images"), text=kwargs.get("texts"))
            assert _cosines(served, direct).min() >= 0.9999
        with pytest.raises(InferenceServerException, match=r"images\[0\].*not a readable image"):
            client.infer("bgevl", inputs(images=[b"not an image"]))
        served = client.infer("bgevl", inputs(texts=TEXTS[:1])).as_numpy("EMBEDDING")  # still serving
        assert _cosines(served, embedder.encode(text=TEXTS[:1])).min() >= 0.9999
    finally:
        assert server.alive(), server.log_tail()
        server.stop()
        assert not server.group_alive()


def test_the_benchmark_baseline_computes_the_original(checkpoints, originals):
    """bgevl-bench's PyTorch baseline (the text model with SDPA attention) on each workload's request."""
    family = get_family("visualized")
    baseline = family.torch_baseline(checkpoints["tiny-visualized"], threads=1)
    for workload, (images, texts) in {"image": (IMAGES, None), "text": (None, TEXTS), "composed": (IMAGES, TEXTS)}.items():
        request = family.bench_request(workload, images, texts)
        got = baseline.call(request, baseline.preprocessor.prepare(request))()
        want = originals["tiny-visualized"].encode(images, texts)
        assert _cosines(got, want).min() >= 0.99999, workload
        assert baseline.gflop(request, baseline.preprocessor.prepare(request)) > 0
