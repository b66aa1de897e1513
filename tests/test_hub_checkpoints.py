"""Checkpoints laid out as the hub publishes them: faithful float32 exports, and broken ones refused.

The fixtures (``tests/hub_layout.py``) reproduce the BGE-VL repositories' file sets: 16-bit weights,
the legacy CLIP preprocessor file, sharded LLaVA-NeXT weights in transformers 4.45 names and the
4.45-era processor configs. Exports are compared with ``bgevl.reference`` (the original's semantics
in float32, weights read from the files directly), never with the model the export was traced from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from bgevl.export import ExportOptions, run_export
from bgevl.export.cli import main
from bgevl.core.probes import PROBE_MODES, in_mode, synthetic_images
from bgevl.families.clip.reference import OriginalClip
from bgevl.families.mllm.reference import OriginalLlavaEmbedder
from bgevl.runtime import Embedder
from hub_layout import PROCESSOR_VARIANTS, clip_hub_checkpoint, mllm_hub_checkpoint

INSTRUCTION = "Retrieve the target image that best meets the combined criteria: "
TEXTS = ["a red car", "two dogs on a beach", "make the sky purple", "aerial view of a harbour"]


def mode_images(seed: int = 5) -> list[Image.Image]:
    """Images in every probe mode: RGB, RGBA (alpha gradient), P (palette) and L; two sizes each."""
    rng = np.random.default_rng(seed)
    return [in_mode(im, PROBE_MODES[i % len(PROBE_MODES)], rng) for i, im in enumerate(synthetic_images(8, seed))]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Hub-layout checkpoints, built once: ``hub("clip-base")``, ``hub("mllm-4.45")``, ..."""
    root = tmp_path_factory.mktemp("hub")
    cache: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in cache:
            family, variant = name.split("-", 1)
            build = clip_hub_checkpoint if family == "clip" else mllm_hub_checkpoint
            cache[name] = build(root / name, variant)
        return cache[name]

    return make


@pytest.fixture(scope="module")
def hub_export(hub, tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-exports")
    cache: dict[tuple, Path] = {}

    def make(name: str, precision: str = "fp32", **kw) -> Path:
        key = (name, precision, tuple(sorted(kw.items())))
        if key not in cache:
            model = "tiny" if name.startswith("clip") else "tiny-mllm"
            out = root / "-".join([name, precision, *map(str, kw.values())])
            cache[key] = run_export(ExportOptions(output=out, model=model, model_path=hub(name), precision=precision, **kw),
                                    sink=lambda msg: None)
        return cache[key]

    return make


def float_types(directory: Path) -> set[int]:
    """Element types of every float initializer and output of every graph in an export."""
    types = set()
    for path in directory.glob("*.onnx"):
        graph = onnx.load(str(path)).graph
        types |= {i.data_type for i in graph.initializer if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                                             onnx.TensorProto.BFLOAT16)}
        types |= {o.type.tensor_type.elem_type for o in graph.output}
    return types


def min_cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sum(a * b, axis=1).min())


# --- CLIP (BGE-VL-base / -large) ------------------------------------------------------------


@pytest.mark.parametrize("like", ["base", "large"])
def test_clip_16bit_checkpoint_exports_float32_graphs_that_match_the_original(like, hub, hub_export):
    stored = {v.dtype for v in load_file(str(hub(f"clip-{like}") / "model.safetensors")).values()}
    assert stored == {torch.float16}  # as on the hub
    directory = hub_export(f"clip-{like}")
    assert float_types(directory) == {onnx.TensorProto.FLOAT}, "fp32 export holds 16-bit weights or outputs"
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["precision"] == "fp32" and manifest["model"]["weights"] == "pretrained"
    assert manifest["validation"]["reference"] == OriginalClip.DESCRIPTION and manifest["validation"]["passed"]
    assert manifest["validation"]["probe_set"]["image_modes"] == ["L", "P", "RGB", "RGBA"]

    original = OriginalClip(hub(f"clip-{like}"))
    emb = Embedder.load(directory, provider="cpu")
    images = mode_images()
    assert {im.mode for im in images} == {"RGB", "RGBA", "P", "L"}
    assert min_cos(emb.encode(images=images), original.encode(images=images)) >= 0.99999
    assert min_cos(emb.encode(text=TEXTS), original.encode(text=TEXTS)) >= 0.99999
    assert min_cos(emb.encode(images=images[:4], text=TEXTS), original.encode(images=images[:4], text=TEXTS)) >= 0.99999


@pytest.mark.parametrize("precision,bound", [("fp16", 0.999), ("int8", 0.99)])
def test_clip_reduced_precisions_validate_against_the_fp32_original(precision, bound, hub, hub_export):
    directory = hub_export("clip-base", precision)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["validation"]["reference"] == OriginalClip.DESCRIPTION and manifest["validation"]["passed"]
    for figures in manifest["validation"]["figures"].values():
        assert figures["min_cosine"] >= bound and figures["max_cosine_between_probes"] < 0.99999
    original = OriginalClip(hub("clip-base"))
    emb = Embedder.load(directory, provider="cpu")
    images = mode_images()
    assert min_cos(emb.encode(images=images), original.encode(images=images)) >= bound
    assert min_cos(emb.encode(text=TEXTS), original.encode(text=TEXTS)) >= bound


def test_reference_is_float32_from_the_files_and_strict(hub, tmp_path):
    directory = hub("clip-base")
    original = OriginalClip(directory)
    assert {p.dtype for p in original.model.parameters()} == {torch.float32}
    stored = load_file(str(directory / "model.safetensors"))
    state = original.model.state_dict()
    assert all(torch.equal(state[k], v.float()) for k, v in stored.items())  # every tensor, exactly the file's
    # a tensor missing from the file fails the reference, it is not initialized at random
    broken = tmp_path / "broken"
    shutil.copytree(directory, broken)
    save_file({k: v for k, v in stored.items() if k != "visual_projection.weight"}, str(broken / "model.safetensors"))
    with pytest.raises(RuntimeError, match="visual_projection.weight"):
        OriginalClip(broken)


def test_image_processor_backend_is_pil_even_where_torchvision_is_installed(hub, monkeypatch):
    """transformers 5 picks the torchvision backend whenever torchvision imports; the hub's legacy
    preprocessor file names none. Pretend torchvision is there and see which backend is asked for."""
    from transformers import AutoProcessor
    from transformers.models.auto import image_processing_auto

    from bgevl.core.preprocessing import load_processor

    asked = []
    real = image_processing_auto._load_class_with_fallback

    def spy(mapping, backend):
        asked.append(backend)
        return real(mapping, backend)

    monkeypatch.setattr(image_processing_auto, "is_torchvision_available", lambda: True)
    monkeypatch.setattr(image_processing_auto, "_load_class_with_fallback", spy)
    AutoProcessor.from_pretrained(hub("clip-base"))
    assert asked == ["torchvision"]  # what an unpinned load would use
    asked.clear()
    processor = load_processor(hub("clip-base"))
    assert asked[-1] == "pil" and type(processor.image_processor).__name__ == "CLIPImageProcessorPil"
    assert getattr(processor.tokenizer, "backend", None) != "pil"  # the pin stays with the image processor


# --- MLLM (BGE-VL-MLLM-S1/-S2, v1.5) ---------------------------------------------------------


def mllm_items(images):
    return [(images[0], None, "candidate"), (None, "a red car", "candidate"), (images[1], "make it blue", "query"),
            (images[2], None, "candidate"), (images[3], "same but at night", "query"), (None, "two dogs", "query")]


def encode_items(emb, items):
    out = []
    for image, text, role in items:
        out.append(emb.encode(images=[image] if image is not None else None, text=[text] if text is not None else None,
                              role=role, instruction=INSTRUCTION if role == "query" else None))
    return np.concatenate(out)


def test_old_processor_configs_break_plain_transformers_5(hub):
    """What the fixtures reproduce: transformers 5's processor on a 4.45-era config counts one image
    token too few, and without processor_config.json it has no patch size."""
    from transformers import AutoProcessor

    from bgevl.families.mllm.checkpoint import load_mllm

    image = mode_images()[0].convert("RGB").resize((512, 512))
    prompt = "[INST]  <image> [/INST]"
    _, complete = load_mllm(hub("mllm-llava-hf"))
    want = int((complete(text=[prompt], images=[image], return_tensors="np")["input_ids"] == complete.image_token_id).sum())
    plain = AutoProcessor.from_pretrained(hub("mllm-4.45"))
    got = int((plain(text=[prompt], images=[image], return_tensors="np")["input_ids"] == plain.image_token_id).sum())
    assert got == want - 1
    with pytest.raises(TypeError):
        AutoProcessor.from_pretrained(hub("mllm-none"))(text=[prompt], images=[image])


@pytest.mark.parametrize("variant", PROCESSOR_VARIANTS)
def test_mllm_hub_layout_exports_float32_graphs_that_match_the_original(variant, hub, hub_export):
    directory = hub_export(f"mllm-{variant}")
    assert float_types(directory) == {onnx.TensorProto.FLOAT}
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["validation"]["reference"] == OriginalLlavaEmbedder.DESCRIPTION and manifest["validation"]["passed"]
    saved = json.loads((directory / "processor" / "processor_config.json").read_text())
    assert (saved["patch_size"], saved["num_additional_image_tokens"], saved["vision_feature_select_strategy"]) == (14, 1, "default")
    items = mllm_items(mode_images())
    got = encode_items(Embedder.load(directory, provider="cpu"), items)
    want = OriginalLlavaEmbedder(hub(f"mllm-{variant}")).encode(items, INSTRUCTION)
    assert min_cos(got, want) >= 0.9999
    assert (np.argmax(got @ want.T, axis=1) == np.arange(len(items))).all()


@pytest.mark.parametrize("precision,mode,bound", [("fp16", "qdq", 0.999), ("int8", "qdq", 0.99)])
def test_mllm_reduced_precisions_validate_against_the_fp32_original(precision, mode, bound, hub, hub_export):
    directory = hub_export("mllm-4.45", precision, int8_mode=mode)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["validation"]["reference"] == OriginalLlavaEmbedder.DESCRIPTION and manifest["validation"]["passed"]
    assert all(f["min_cosine"] >= bound for f in manifest["validation"]["figures"].values())
    items = mllm_items(mode_images())
    got = encode_items(Embedder.load(directory, provider="cpu"), items)
    assert min_cos(got, OriginalLlavaEmbedder(hub("mllm-4.45")).encode(items, INSTRUCTION)) >= bound


@pytest.mark.parametrize("mode", ["P", "RGBA"])
def test_mllm_images_are_resized_before_the_rgb_conversion(mode, hub):
    """BGE-VL-MLLM's data_process: ``Image.open(p).resize((512, 512)).convert("RGB")``; Pillow resizes
    palette images with NEAREST and RGBA premultiplied, so the order changes the pixels."""
    from bgevl.families.mllm.checkpoint import load_mllm
    from bgevl.families.mllm.preprocessing import ImageLayout, MllmPreprocessor

    model, processor = load_mllm(hub("mllm-llava-hf"))
    pre = MllmPreprocessor(processor, ImageLayout.from_config(model.config), 4096)
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (300, 400, 4), dtype=np.uint8), "RGBA")  # random pixels and alpha
    image = image.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE) if mode == "P" else image
    got = np.asarray(pre.load_images([image])[0], dtype=np.int16)
    np.testing.assert_array_equal(got, np.asarray(image.resize((512, 512)).convert("RGB"), dtype=np.int16))
    convert_first = np.asarray(image.convert("RGB").resize((512, 512)), dtype=np.int16)
    assert np.abs(got - convert_first).max() > 100


# --- broken checkpoints: one line, exit 2, nothing written ------------------------------------


def refused(tmp_path: Path, capsys, model: str, path: Path, *extra: str) -> str:
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(["--model", model, "--model-path", str(path), "--output", str(out), "--format", "onnx", "-q", *extra])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(errors) == 1 and errors[0].startswith("bgevl-export: error: "), err  # one line, ours
    assert not out.exists() and not list(tmp_path.glob(".out*")), "something was written"
    return errors[0]


def broken_copy(hub, name: str, tmp_path: Path) -> Path:
    target = tmp_path / f"broken-{name}"
    shutil.copytree(hub(name), target)
    return target


def edit_weights(directory: Path, edit) -> None:
    tensors = load_file(str(directory / "model.safetensors"))
    save_file(edit(tensors), str(directory / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tokenizer_files_are_refused(hub, tmp_path, capsys):
    path = broken_copy(hub, "clip-base", tmp_path)
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (path / name).unlink()
    line = refused(tmp_path, capsys, "tiny", path)
    assert "no tokenizer files (tokenizer.json or vocab.json + merges.txt)" in line


def test_degenerate_tokenizer_is_refused(hub, tmp_path, capsys):
    """A tokenizer.json with no vocabulary: transformers maps every text to [0 2 2 ...]."""
    path = broken_copy(hub, "clip-base", tmp_path)
    data = json.loads((path / "tokenizer.json").read_text())
    data["model"]["vocab"] = {k: v for k, v in data["model"]["vocab"].items() if k.startswith("<|")}
    data["model"]["merges"] = []
    (path / "tokenizer.json").write_text(json.dumps(data))
    for name in ("vocab.json", "merges.txt"):
        (path / name).unlink()
    assert "the tokenizer is degenerate" in refused(tmp_path, capsys, "tiny", path)


def test_missing_text_tower_is_refused_listing_tensors(hub, tmp_path, capsys):
    path = broken_copy(hub, "clip-base", tmp_path)
    edit_weights(path, lambda t: {k: v for k, v in t.items() if not k.startswith("text_model.")})
    line = refused(tmp_path, capsys, "tiny", path)
    assert "tensors missing (text_model.embeddings.position_embedding.weight" in line and "more)" in line


def test_unexpected_tensors_are_refused(hub, tmp_path, capsys):
    path = broken_copy(hub, "clip-base", tmp_path)
    edit_weights(path, lambda t: {**t, "head.classifier.weight": torch.zeros(3, 3, dtype=torch.float16)})
    assert "1 tensors unexpected (head.classifier.weight)" in refused(tmp_path, capsys, "tiny", path)


def test_bert_checkpoint_is_refused(tmp_path, capsys):
    from transformers import BertConfig, BertModel

    path = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).save_pretrained(path)
    line = refused(tmp_path, capsys, "base", path)
    assert "holds a 'bert' checkpoint (BertModel), not a CLIP dual encoder" in line


def test_a_checkpoint_of_another_size_is_refused_naming_the_right_model(tmp_path, capsys):
    from transformers import CLIPConfig

    from bgevl.core.registry import get_model_spec

    path = tmp_path / "large"
    path.mkdir()
    CLIPConfig(**get_model_spec("large").architecture).save_pretrained(path)  # checked before any weight is read
    line = refused(tmp_path, capsys, "base", path)
    assert "is not BAAI/BGE-VL-base: projection_dim 768 (spec 512)" in line and "it matches --model large" in line


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_truncated_or_corrupt_weights_are_refused(damage, hub, tmp_path, capsys):
    path = broken_copy(hub, "clip-base", tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00" * 4096)
    line = refused(tmp_path, capsys, "tiny", path)
    assert "model.safetensors: unreadable weight file" in line and "download it again" in line


def test_missing_image_processor_file_is_refused(hub, tmp_path, capsys):
    path = broken_copy(hub, "clip-base", tmp_path)
    (path / "preprocessor_config.json").unlink()
    assert "no image-processor settings (preprocessor_config.json)" in refused(tmp_path, capsys, "tiny", path)


def test_missing_mllm_shard_is_refused(hub, tmp_path, capsys):
    path = broken_copy(hub, "mllm-4.45", tmp_path)
    (path / "model-00003-of-00004.safetensors").unlink()
    line = refused(tmp_path, capsys, "tiny-mllm", path)
    assert "the weight index names shards that are not there (model-00003-of-00004.safetensors)" in line


def test_contradicting_processor_config_is_refused(hub, tmp_path, capsys):
    path = broken_copy(hub, "mllm-llava-hf", tmp_path)
    config = json.loads((path / "processor_config.json").read_text())
    (path / "processor_config.json").write_text(json.dumps({**config, "num_additional_image_tokens": 0}))
    assert "num_additional_image_tokens is 0 but the model config needs 1" in refused(tmp_path, capsys, "tiny-mllm", path)


def test_sanity_gate_refuses_embeddings_that_do_not_tell_inputs_apart(hub, tmp_path, capsys):
    """Weights that load cleanly but project every image onto one direction: the reference itself gives
    distinct images the same embedding, and validation says so."""
    path = broken_copy(hub, "clip-base", tmp_path)

    def rank_one(tensors):
        w = tensors["visual_projection.weight"]
        tensors["visual_projection.weight"] = (torch.ones(w.shape[0], 1) @ torch.ones(1, w.shape[1]) * 0.05).to(w.dtype)
        return tensors

    edit_weights(path, rank_one)
    line = refused(tmp_path, capsys, "tiny", path)
    assert "the fp32 reference fails the sanity gate: reference images: different probe inputs give the same embedding" in line


def test_check_command_reports_a_good_checkpoint(hub, capsys):
    assert main(["check", "--model", "tiny-mllm", "--model-path", str(hub("mllm-none"))]) == 0
    out = capsys.readouterr().out
    assert "4 file(s), 81 tensors stored as BF16" in out and "loaded as float32" in out
    assert "finite and distinct" in out and out.strip().endswith("checkpoint OK")


@pytest.mark.parametrize("name, model", [("clip-base", "tiny"), ("mllm-4.45", "tiny-mllm")])
def test_model_is_read_from_the_checkpoints_config_when_not_given(name, model, hub, tmp_path, capsys):
    """``--model-path DIR`` without ``--model``: the family from config.json's model_type, the spec from its sizes
    (these small checkpoints match no hub model, so the family's generated spec, which accepts any size)."""
    out = tmp_path / name
    assert main(["--model-path", str(hub(name)), "--output", str(out), "--format", "onnx"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["key"] == model and manifest["validation"]["passed"]
    assert f"--model {model} " in capsys.readouterr().err


def test_the_hub_model_whose_sizes_a_config_matches_is_inferred(tmp_path):
    from transformers import BertConfig, CLIPConfig, LlavaNextConfig

    from bgevl.checkpoints import infer_model_specs
    from bgevl.core.errors import CheckpointError
    from bgevl.core.registry import get_model_spec

    for key in ("base", "large", "mllm-s1"):
        path = tmp_path / key
        spec = get_model_spec(key)
        config_class = LlavaNextConfig if spec.family == "mllm" else CLIPConfig
        config_class(**spec.architecture).save_pretrained(path)
        keys = [m.key for m in infer_model_specs(path)]
        assert keys == ([key] if spec.family == "clip" else ["mllm-s1", "mllm-s2", "mllm-v1.5-zs", "mllm-v1.5-mmeb"])
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path / "bert")
    with pytest.raises(CheckpointError, match=r"model_type 'bert', which no model family reads .*; pass --model"):
        infer_model_specs(tmp_path / "bert")
