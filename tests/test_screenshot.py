"""The screenshot family (BGE-VL-Screenshot, Qwen2.5-VL) on its generated tiny checkpoint: the host-side layouts
against transformers' own functions, the exports against transformers' own forward (the independent reference:
``OriginalScreenshot`` reads the safetensors itself and runs ``Qwen2_5_VLModel`` with ``get_rope_index``), images
of many sizes in one call, and the recipe's refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from bgevl.core.errors import InputError
from bgevl.core.family import CANDIDATE, QUERY, Request
from bgevl.core.registry import get_family, get_model_spec
from bgevl.families.screenshot.layout import VisionGeometry, image_layout, rope_positions
from bgevl.families.screenshot.preprocessing import SCREENSHOT_QUERY_INSTRUCTION
from bgevl.runtime import Embedder

#: (height, width): sizes whose grids cover one window and several, full and cut windows, both aspect ratios,
#: and an image the processor scales down to the pixel bound
SIZES = [(60, 100), (200, 300), (400, 90), (56, 56), (1000, 800), (130, 61)]
TEXTS = ["a page", "search results table with a blue title", "menu button", "the title", "a chart", "red"]


def images() -> list[Image.Image]:
    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


@pytest.fixture(scope="session")
def screenshot_checkpoint(tmp_path_factory):
    family = get_family("screenshot")
    return family.generate_checkpoint(get_model_spec("tiny-screenshot"), tmp_path_factory.mktemp("ckpt") / "tiny-screenshot")


@pytest.fixture(scope="session")
def original(screenshot_checkpoint):
    return get_family("screenshot").original(screenshot_checkpoint)


@pytest.mark.parametrize("grid", [(1, 4, 8), (1, 12, 18), (1, 2, 2), (1, 8, 8), (1, 10, 6), (1, 16, 34), (2, 6, 4)])
@pytest.mark.parametrize("window_size", [56, 112])
def test_vision_layout_is_transformers_window_order_rotary_ids_and_segments(grid, window_size):
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    layout = image_layout(grid, VisionGeometry(14, 2, window_size))
    window_index, cu_window = get_vision_window_index(torch.tensor([grid]), 2, window_size, 14)
    positions = get_vision_position_ids(torch.tensor([grid]), 2).numpy()
    order = (window_index.numpy()[:, None] * 4 + np.arange(4)).reshape(-1)
    np.testing.assert_array_equal(layout.order, order)
    np.testing.assert_array_equal(layout.positions.reshape(-1, 2), positions[order])
    # each image token's window: the segment of cu_window_seqlens its patches fall in
    patch_window = np.searchsorted(cu_window.numpy()[1:], np.arange(len(order)), side="right")
    np.testing.assert_array_equal(np.repeat(layout.windows, 4), patch_window)
    np.testing.assert_array_equal(layout.restore, np.argsort(window_index.numpy()))


def test_rope_positions_are_get_rope_index_under_left_padding(screenshot_checkpoint, original):
    """A batch of a composed query, an image-only item, a text-only item and an item of a tall image, left-padded:
    every real token's (t, row, column) position is get_rope_index's."""
    processor = original.processor
    items = [("a page", 0), (None, 1), ("just some text", None), ("tall", 2)]
    prompts = [processor.apply_chat_template(original.prompts.messages(t, i is not None, SCREENSHOT_QUERY_INSTRUCTION),
                                             tokenize=False, add_generation_prompt=True) for t, i in items]
    imgs = [images()[i] for _, i in items if i is not None]
    enc = processor(text=prompts, images=imgs, padding=True, return_tensors="pt")
    want, _ = original.model.get_rope_index(enc["input_ids"], enc["mm_token_type_ids"], enc["image_grid_thw"],
                                            attention_mask=enc["attention_mask"])
    got = rope_positions(enc["input_ids"].numpy(), enc["attention_mask"].numpy(),
                         [tuple(g) for g in enc["image_grid_thw"].tolist()], processor.image_token_id, 2)
    real = enc["attention_mask"].numpy() > 0
    assert not real.all()  # padded
    np.testing.assert_array_equal(got[:, real], want.numpy()[:, real])


def test_the_generated_checkpoint_has_the_released_file_layout(screenshot_checkpoint):
    from safetensors import safe_open

    with safe_open(str(screenshot_checkpoint / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "visual.patch_embed.proj.weight" in names and "model.embed_tokens.weight" in names
    assert not any(n.startswith(("model.visual.", "model.language_model.", "lm_head.")) for n in names)
    pre = json.loads((screenshot_checkpoint / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "Qwen2VLImageProcessor" and {"min_pixels", "max_pixels"} <= set(pre)
    assert "<|image_pad|>" in json.loads((screenshot_checkpoint / "chat_template.json").read_text())["chat_template"]
    config = json.loads((screenshot_checkpoint / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl" and config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]


def _items(n: int):
    imgs = images()
    return imgs[:n], TEXTS[:n]


@pytest.mark.parametrize("precision,mode,bound", [("fp32", None, 0.99999), ("fp16", None, 0.999),
                                                  ("int8", "qdq", 0.999), ("int8", "dynamic", 0.999)])
def test_exports_match_the_original_on_images_of_many_sizes_in_one_call(precision, mode, bound, export_dir, original):
    kw = {"int8_mode": mode} if mode else {}
    directory = export_dir(precision, model="tiny-screenshot", **kw)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["validation"]["passed"]
    imgs, texts = _items(len(SIZES))
    with Embedder.load(directory, provider="cpu") as embedder:
        got = {
            "image": embedder.encode(images=imgs),
            "text": embedder.encode(text=texts, role=QUERY, instruction=SCREENSHOT_QUERY_INSTRUCTION),
            "composed": embedder.encode(images=imgs, text=texts, role=QUERY, instruction=SCREENSHOT_QUERY_INSTRUCTION),
        }
    want = {
        "image": original.embed(Request(imgs, None, CANDIDATE)),
        "text": original.embed(Request(None, texts, QUERY, SCREENSHOT_QUERY_INSTRUCTION)),
        "composed": original.embed(Request(imgs, texts, QUERY, SCREENSHOT_QUERY_INSTRUCTION)),
    }
    for kind in got:
        cos = np.sum(got[kind] * want[kind], axis=1)
        assert cos.min() >= bound, (kind, cos)
        assert (np.argmax(got[kind] @ want[kind].T, axis=1) == np.arange(len(SIZES))).all(), kind


def test_items_together_and_one_at_a_time_give_the_same_vectors(export_dir):
    imgs, texts = _items(len(SIZES))
    with Embedder.load(export_dir("fp32", model="tiny-screenshot"), provider="cpu") as embedder:
        mixed_images = [imgs[0], None, imgs[2], imgs[3], None, imgs[5]]
        mixed_texts = [texts[0], texts[1], None, texts[3], texts[4], None]
        together = embedder.encode(images=mixed_images, text=mixed_texts, role=QUERY, instruction=SCREENSHOT_QUERY_INSTRUCTION)
        alone = np.concatenate([embedder.encode(images=[i], text=[t], role=QUERY, instruction=SCREENSHOT_QUERY_INSTRUCTION)
                                for i, t in zip(mixed_images, mixed_texts)])
    assert np.sum(together * alone, axis=1).min() >= 0.99999


def test_a_query_and_a_candidate_embed_differently_and_instructions_only_on_queries(export_dir):
    with Embedder.load(export_dir("fp32", model="tiny-screenshot"), provider="cpu") as embedder:
        query = embedder.encode(text=["a page"], role=QUERY, instruction=SCREENSHOT_QUERY_INSTRUCTION)
        candidate = embedder.encode(text=["a page"], role=CANDIDATE)
        assert float(query[0] @ candidate[0]) < 0.99999
        with pytest.raises(InputError, match="instruction applies to queries only"):
            embedder.encode(text=["a page"], role=CANDIDATE, instruction="x")
        with pytest.raises(InputError, match="item 1: needs an image, a text or both"):
            embedder.encode(images=[images()[0], None], text=["a", None])
        # the model's control tokens in a user's text would change the prompt (or fail in the processor)
        with pytest.raises(InputError, match=r"^text\[1\]: holds the model's control token '<\|image_pad\|>'"):
            embedder.encode(images=images()[:2], text=["a", "see <|image_pad|> here"])
        with pytest.raises(InputError, match=r"^instruction: holds the model's control token '<\|im_end\|>'"):
            embedder.encode(text=["a"], role=QUERY, instruction="Represent it.<|im_end|>")
        # an image the limits refuse is refused in one line, also where its cost is estimated first
        with pytest.raises(InputError, match="aspect ratio of 250:1, over the limit"):
            embedder.encode(images=[Image.new("RGB", (1, 250))])


def test_an_over_long_prompt_is_refused_in_one_line(export_dir):
    with Embedder.load(export_dir("fp32", model="tiny-screenshot", max_sequence_length=256), provider="cpu") as embedder:
        embedder.encode(images=[images()[4]], text=["a chart"])  # 64 image tokens and a prompt: fits
        with pytest.raises(InputError) as info:
            embedder.encode(images=[images()[4], images()[3]], text=["a chart", "red " * 250])
    message = str(info.value)
    assert message.startswith("item 1 (") and "over the exported sequence limit of 256 tokens" in message
    assert "\n" not in message


def test_one_vision_call_over_several_images_equals_a_call_per_image(export_dir):
    """The image segments keep images apart in the full-attention blocks and the window ids in the windowed ones:
    two images' tokens in one feed give what two calls give. The graph is declared not splittable, so no runner
    cuts a feed longer than its declared maximum into chunks (its tokens attend to each other): it is refused."""
    from bgevl.core.manifest import read_manifest
    from bgevl.families.screenshot.graphs import IMAGE_FEATURES, SCREENSHOT_VISION_GRAPH
    from bgevl.families.screenshot.preprocessing import vision_feeds
    from bgevl.runtime.runners import OnnxRunner

    directory = export_dir("fp32", model="tiny-screenshot")
    spec = read_manifest(directory).graph_spec(SCREENSHOT_VISION_GRAPH)
    assert not spec.splittable and not spec.batch_aligned
    runner = OnnxRunner(spec, directory / spec.filename)
    with Embedder.load(directory, provider="cpu") as embedder:
        pre = embedder.preprocessor
        enc = pre.processor(text=["<|image_pad|>", "<|image_pad|>"], images=[images()[0], images()[5]], return_tensors="np")
    grids = [tuple(int(v) for v in g) for g in enc["image_grid_thw"]]
    feeds = vision_feeds(enc["pixel_values"], grids, pre.geometry)
    inputs = [n.name for n in spec.inputs]
    together = runner.run({n: feeds[n] for n in inputs}, [IMAGE_FEATURES])[IMAGE_FEATURES]
    first = int(feeds["image_token_counts"][0])
    apart = np.concatenate([runner.run({n: feeds[n][:first] for n in inputs}, [IMAGE_FEATURES])[IMAGE_FEATURES],
                            runner.run({n: feeds[n][first:] for n in inputs}, [IMAGE_FEATURES])[IMAGE_FEATURES]])
    np.testing.assert_allclose(together, apart, atol=1e-5)
    assert first > 1 and len(together) - first > 1
    doubled = {n: np.concatenate([feeds[n]] * 4) for n in inputs}
    with pytest.raises(InputError, match="image_tokens .* is outside the served range 1..64"):
        runner.run(doubled, [IMAGE_FEATURES])


def test_batches_are_cut_by_a_token_budget_and_give_the_same_vectors(export_dir):
    """An item's cost is its prompt's tokens, its image's counted from the header by the processor's resize rule
    (exactly what ``prepare`` then produces); a batch holds at most the budget once padded to its longest item."""
    from bgevl.core.family import batch_spans

    assert batch_spans(5, 8) == [(0, 5)]
    assert batch_spans(5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert batch_spans(4, 8, [10, 10, 50, 10], 60) == [(0, 2), (2, 3), (3, 4)]
    assert batch_spans(3, 8, [100, 5, 5], 60) == [(0, 1), (1, 3)]  # over the budget alone: alone
    directory = export_dir("fp32", model="tiny-screenshot")
    imgs, texts = _items(len(SIZES))
    with Embedder.load(directory, provider="cpu") as whole, Embedder.load(directory, provider="cpu", token_budget=200) as cut:
        request = Request(imgs, texts, QUERY, SCREENSHOT_QUERY_INSTRUCTION)
        costs = cut.preprocessor.item_costs(request)
        seen: list = []
        got = cut.encode(images=imgs, text=texts, role=QUERY, instruction=SCREENSHOT_QUERY_INSTRUCTION,
                         on_feeds=lambda f: seen.append(f["attention_mask"]))
        want = whole.encode(images=imgs, text=texts, role=QUERY, instruction=SCREENSHOT_QUERY_INSTRUCTION)
    assert [int(n) for mask in seen for n in mask.sum(axis=1)] == costs  # the estimate is the real prompt length
    assert len(seen) > 1 and all(mask.size <= 200 or len(mask) == 1 for mask in seen)
    assert np.sum(got * want, axis=1).min() >= 0.99999


def test_bgevl_embed_and_bgevl_eval_work_unchanged(export_dir, tmp_path, capsys):
    """The corpus job (images of several sizes) and the retrieval evaluation on
    pairs and composed triplets, through the generic command lines."""
    from bgevl.corpus.cli import main as embed_main
    from bgevl.quality.cli import main as eval_main
    from bgevl.quality.synthetic import write_quality_data

    directory = export_dir("fp32", model="tiny-screenshot")
    folder = tmp_path / "folder"
    folder.mkdir()
    paths = []
    for i, image in enumerate(images()):
        paths.append(folder / f"{i}.png")
        image.save(paths[-1])
    assert embed_main(["--export", str(directory), "--input", str(folder), "--output", str(tmp_path / "out"),
                       "--quiet"]) == 0
    vectors = np.load(tmp_path / "out" / "img_emb" / "img_emb_00000.npy")
    with Embedder.load(directory, provider="cpu") as embedder:
        direct = embedder.encode(images=[str(p) for p in paths])
    assert np.sum(vectors * direct, axis=1).min() >= 0.99999
    write_quality_data(str(tmp_path / "data"), bases=6, variants=2, pairs=12)
    assert eval_main(["--export", str(directory), "--pairs", str(tmp_path / "data" / "pairs"), "--triplets",
                      str(tmp_path / "data" / "triplets.json"), "--gallery", str(tmp_path / "data" / "gallery"),
                      "--json", str(tmp_path / "report.json"), "--quiet"]) == 0
    (run,) = json.loads((tmp_path / "report.json").read_text())["runs"]
    assert run["family"] == "screenshot" and {"t2i", "i2t"} <= set(run["tasks"]) and len(run["tasks"]) == 3


def test_bgevl_bench_measures_the_screenshot_family_against_transformers(tmp_path):
    """The PyTorch baseline is transformers' own batched, left-padded forward with get_rope_index positions: the
    export agrees with it (min cosine reported per row) and every row is timed."""
    from bgevl.benchmarks.cli import main as bench_main

    workloads = "image@112x84,image@224x168,text,composed"  # two screenshot sizes: 12 and 48 image tokens each
    assert bench_main(["--models", "tiny-screenshot", "--backends", "pytorch,onnxruntime-fp32", "--workloads",
                       workloads, "--batch-sizes", "2", "--warmup", "1", "--min-repeats", "2",
                       "--min-seconds", "0", "--peak-sizes", "256", "--output", str(tmp_path / "bench")]) == 0
    rows = json.loads((tmp_path / "bench" / "results.json").read_text())["results"]
    onnx_rows = {r["workload"]: r for r in rows if r["backend"] == "onnxruntime-fp32"}
    assert set(onnx_rows) == set(workloads.split(","))
    assert all(r["min_cosine_vs_pytorch"] >= 0.99999 for r in onnx_rows.values()), onnx_rows
    # tokens/s beside items/s: a batch's tokens (prompt and image tokens, padded) over its time
    per_item = {w: r["tokens_per_s"] / r["items_per_s"] for w, r in onnx_rows.items()}
    # items/s and tokens/s are each a count over the same p50, so their ratio is exact only up to rounding
    assert per_item["image@224x168"] - per_item["image@112x84"] == pytest.approx(48 - 12, abs=1e-6), per_item
    report = (tmp_path / "bench" / "report.md").read_text()
    assert "| tokens/s |" in report and "| image@224x168 | 2 | onnxruntime-fp32 |" in report


def test_the_recipe_s_inferred_facts_are_export_options_the_reference_follows(export_dir):
    """A user who has read the real files corrects a declaration by an option: the manifest records it, the
    reference computes with it (validation passes) and the embeddings change."""
    options = {"screenshot_content_order": "image-first", "screenshot_instruction_role": "user",
               "screenshot_candidate_instruction": "Represent the given input.", "screenshot_max_pixels": 20000}
    directory = export_dir("fp32", model="tiny-screenshot", family_options=tuple(options.items()))
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["validation"]["passed"]
    assert manifest["recipe"]["prompts"] == {"instruction_role": "user", "candidate_instruction": "Represent the given input.",
                                             "content_order": "image-first", "add_generation_prompt": True}
    assert manifest["recipe"]["pixel_bounds"]["max_pixels"] == 20000
    imgs, texts = _items(2)
    with Embedder.load(directory, provider="cpu") as changed, \
            Embedder.load(export_dir("fp32", model="tiny-screenshot"), provider="cpu") as default:
        kw = dict(images=imgs, text=texts, role=QUERY, instruction=SCREENSHOT_QUERY_INSTRUCTION)
        assert np.sum(changed.encode(**kw) * default.encode(**kw), axis=1).max() < 0.9999
        feeds = changed.preprocessor.prepare(Request([imgs[1]], None, CANDIDATE))
        assert len(feeds["image_token_counts"]) == 1 and int(feeds["image_token_counts"][0]) * 784 <= 20000


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "chat_template.json").unlink(), "no chat template"),
    (lambda d: _edit_json(d / "config.json", image_token_id=3), "<|image_pad|> is"),
    (lambda d: _edit_json(d / "preprocessor_config.json", patch_size=16), "patch_size 16 in preprocessor_config.json"),
])
def test_processor_files_that_contradict_the_model_are_refused_in_one_line(damage, message, screenshot_checkpoint, tmp_path):
    import shutil

    from bgevl.core.errors import BgevlError
    from bgevl.export import ExportOptions, run_export

    copy = tmp_path / "ckpt"
    shutil.copytree(screenshot_checkpoint, copy)
    damage(copy)
    with pytest.raises(BgevlError) as info:
        run_export(ExportOptions(output=tmp_path / "out", model="tiny-screenshot", model_path=copy), sink=lambda m: None)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def _edit_json(path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_tensorrt_profiles_and_build_engines_options_take_the_image_axes():
    """The vision graph's one axis counts an image's tokens (patches are 4 per token by shape), the language graph's
    image rows a batch's: both are profile axes of their own (``build-engines --max-image-tokens/--max-image-rows``)."""
    from transformers import Qwen2_5_VLConfig

    from bgevl.export.cli import build_engines_parser
    from bgevl.families.screenshot.graphs import screenshot_graph_specs
    from bgevl.graphs.engines import axis_ranges, profile_shapes

    config = Qwen2_5_VLConfig(**get_model_spec("screenshot").architecture)
    graphs = screenshot_graph_specs(config, max_pixels=12845056, opt_batch=2, max_batch=8, max_sequence=4096)
    vision, language = graphs["screenshot_vision"], graphs["screenshot_language"]
    assert vision.input("pixel_patches").concrete_shape("max") == (16384, 4, 1176)
    shapes = profile_shapes(vision, axis_ranges(vision, max_image_tokens=4096))
    assert shapes["pixel_patches"]["max"] == [4096, 4, 1176] and shapes["vision_positions"]["max"] == [4096, 4, 2]
    assert shapes["window_segments"] == {"min": [1], "opt": [1024], "max": [4096]}
    shapes = profile_shapes(language, axis_ranges(language, max_image_rows=8192, max_sequence=2048))
    assert shapes["image_features"]["max"] == [8192, 2048] and shapes["rope_positions"]["max"] == [3, 8, 2048]
    args = build_engines_parser().parse_args(["export", "--max-image-tokens", "4096", "--max-image-rows", "8192"])
    assert (args.max_image_tokens, args.max_image_rows) == (4096, 8192)


def test_a_workload_size_is_width_x_height_on_an_image_kind():
    from bgevl.benchmarks.suite import split_workload
    from bgevl.core.errors import BgevlError

    assert split_workload("image") == ("image", None)
    assert split_workload("composed@1920x1080") == ("composed", (1920, 1080))
    for bad in ("video", "text@10x10", "image@1920", "image@0x5", "image@axb"):
        with pytest.raises(BgevlError, match=r"^--workloads: "):
            split_workload(bad)
