"""The screenshot family: BGE-VL-Screenshot, a Qwen2.5-VL-3B embedder of screenshots, texts and screenshot+text
queries (BAAI/BGE-VL-Screenshot; VectorSpaceLab/Vis-IR).

Images of any size become a varying number of image tokens (14-px patches merged 2x2, the image resized by
``smart_resize`` between the processor's pixel bounds). Two graphs: the vision tower on one image's patches at a
time (ragged: one call per image), and the language model on the batch (left-padded chat prompts with the image
features placed, M-RoPE positions) returning the L2-normalized final-norm hidden state of the last token. What
varies with the grid (window order, rotary positions, attention segments, M-RoPE positions) is computed on the
host (``layout``). Files: ``graphs``, ``layout``, ``modules``, ``checkpoint``, ``processor``, ``preprocessing``
(the recipe's declarations), ``reference``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from bgevl.core.errors import BgevlError
from bgevl.core.family import CANDIDATE, QUERY, Call, CheckpointKind, ExportedModel, Feeds, Original, Preprocessor, Request, Steps, TorchBaseline
from bgevl.core.specs import ATTENTION_MASK, INPUT_IDS, GraphSpec, ModelSpec, TensorSpec
from bgevl.families.decoder import DecoderEmbedderFamily
from bgevl.families.screenshot.graphs import (
    EMBEDDING, IMAGE_FEATURE_INDEX, IMAGE_FEATURES, IMAGE_RESTORE, IMAGE_SEGMENTS, IMAGE_TOKEN_COUNTS, PIXEL_PATCHES,
    ROPE_POSITIONS, SCREENSHOT_LANGUAGE_GRAPH, SCREENSHOT_MAX_BATCH, SCREENSHOT_OPT_BATCH, SCREENSHOT_VISION_GRAPH,
    VISION_POSITIONS, WINDOW_SEGMENTS,
)
from bgevl.families.screenshot.preprocessing import SCREENSHOT_QUERY_INSTRUCTION

if TYPE_CHECKING:  # pragma: no cover  (types only)
    import argparse

    import torch

    from bgevl.core.options import ExportOptions
    from bgevl.core.preprocessing import InputLimits
    from bgevl.core.probes import ProbeSet

VISION_INPUTS = (PIXEL_PATCHES, VISION_POSITIONS, WINDOW_SEGMENTS, IMAGE_SEGMENTS)
#: Items per validation request: image-only, text-only and composed items mixed
VALIDATION_BATCH = 4
#: The tokens one batch holds at most by default, padding included (items x the longest prompt): a 1080p
#: screenshot is ~1,200 image tokens at Qwen2.5-VL's class default bound and 2,700 at the base's, a text query
#: a few dozen, so batches are cut by tokens as well as by items
SCREENSHOT_TOKEN_BUDGET = 8192


def _qwen2_5_vl_arch(*, vision: dict[str, Any], text: dict[str, Any]) -> dict[str, Any]:
    """Qwen2_5_VLConfig kwargs: the fixed parts of Qwen2.5-VL (SiLU vision MLP, 14-px patches, 2 frames per patch,
    2x2 merge, M-RoPE, tied embeddings, no sliding window) around the sizes that differ."""
    return {
        "vision_config": {"hidden_act": "silu", "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2,
                          "in_chans": 3, "tokens_per_second": 2, **vision},
        "text_config": {"rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 128000,
                        "tie_word_embeddings": True, "use_sliding_window": False, "hidden_act": "silu", **text},
        "tie_word_embeddings": True,
    }


#: Qwen2.5-VL-3B-Instruct's config.json (the base of BGE-VL-Screenshot: 3.75B parameters, tied embeddings)
_QWEN2_5_VL_3B = _qwen2_5_vl_arch(
    vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, window_size=112,
                fullatt_block_indexes=[7, 15, 23, 31], out_hidden_size=2048),
    text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
              num_key_value_heads=2, vocab_size=151936, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
)

MODELS = (
    ModelSpec(
        "tiny-screenshot", "screenshot",
        "small random-weight Qwen2.5-VL embedder (same architecture as BGE-VL-Screenshot: windowed ViT with 2x2 "
        "merger + Qwen2.5 decoder with M-RoPE, 4 vision and 2 text layers), generated offline",
        architecture=_qwen2_5_vl_arch(
            vision=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, window_size=56,
                        fullatt_block_indexes=[1, 3], out_hidden_size=64),
            text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=0, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})),
    ),
    ModelSpec(
        "screenshot", "screenshot",
        "BAAI/BGE-VL-Screenshot: Qwen2.5-VL-3B screenshot embedder (3.75B parameters)",
        hub_id="BAAI/BGE-VL-Screenshot", architecture=_QWEN2_5_VL_3B, billions=3.75, fp32_too_large=True,
    ),
)

#: The pixel bounds of generated checkpoints' processors: the tiny model's keep images small (at most 64 image
#: tokens); the full-size architecture gets Qwen2.5-VL-3B-Instruct's preprocessor_config.json bounds
GENERATED_PIXEL_BOUNDS = {"tiny-screenshot": {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 64}}
QWEN2_5_VL_PIXEL_BOUNDS = {"min_pixels": 3136, "max_pixels": 12845056}


class ScreenshotFamily(DecoderEmbedderFamily):
    name = "screenshot"
    description = "Qwen2.5-VL screenshot embedders (BGE-VL-Screenshot): images of any size, last-token hidden state"
    models = MODELS
    vision_graph, language_graph = SCREENSHOT_VISION_GRAPH, SCREENSHOT_LANGUAGE_GRAPH
    query_instruction = SCREENSHOT_QUERY_INSTRUCTION
    default_batch = (SCREENSHOT_OPT_BATCH, SCREENSHOT_MAX_BATCH)
    # build-engines --max-image-tokens / --max-image-rows
    profile_axes = {"image_tokens": "image tokens of one vision call (one image)",
                    "image_rows": "image tokens of one language call (a batch's images)"}
    checkpoint_kind = CheckpointKind(
        "qwen2_5_vl", "Qwen2.5-VL embedder (Qwen2_5_VLForConditionalGeneration)", "Qwen2_5_VLConfig",
        (("tokenizer.json",), ("vocab.json", "merges.txt")),
        ("vision_config.depth", "vision_config.hidden_size", "vision_config.window_size", "text_config.hidden_size",
         "text_config.num_hidden_layers", "text_config.num_key_value_heads", "text_config.intermediate_size"),
    )
    # prompts, M-RoPE positions, the feature index; each image's patches and layout where a request has images
    preprocess_feeds = ((INPUT_IDS, ATTENTION_MASK, ROPE_POSITIONS, IMAGE_FEATURE_INDEX),
                        (*VISION_INPUTS, IMAGE_TOKEN_COUNTS, IMAGE_RESTORE))
    host_feeds = tuple(TensorSpec(name, "int64", (-1,)) for name in (IMAGE_TOKEN_COUNTS, IMAGE_RESTORE))

    # --- checkpoints -------------------------------------------------------------------
    def generate_checkpoint(self, spec: ModelSpec, directory: Path) -> Path:
        from bgevl.families.screenshot.checkpoint import generate_screenshot_checkpoint

        return generate_screenshot_checkpoint(spec, directory, GENERATED_PIXEL_BOUNDS.get(spec.key, QWEN2_5_VL_PIXEL_BOUNDS))

    def load(self, path: Path, spec: ModelSpec | None = None, attn_implementation: str = "eager") -> tuple[Any, Any]:
        from bgevl.families.screenshot.checkpoint import load_screenshot

        return load_screenshot(path, attn_implementation, spec)

    def original(self, path: Path, recipe: Mapping[str, Any] | None = None) -> Original:
        """With an export's ``recipe``: its prompts and pixel bounds (the options it was made with)."""
        from bgevl.families.screenshot.preprocessing import ScreenshotPrompts
        from bgevl.families.screenshot.reference import OriginalScreenshot

        if recipe is None:
            return OriginalScreenshot(path)
        return OriginalScreenshot(path, ScreenshotPrompts.from_json(recipe["prompts"]), **recipe["pixel_bounds"])

    # --- export ------------------------------------------------------------------------
    def add_export_arguments(self, group: argparse._ArgumentGroup) -> None:
        """The recipe's inferred facts, each correctable without code by a user who has read the real files
        (``ScreenshotPrompts``; defaults: the reconstruction cited there), and the pixel bounds."""
        from bgevl.families.screenshot.preprocessing import ScreenshotPrompts

        default = ScreenshotPrompts()
        group.add_argument("--screenshot-instruction-role", choices=("system", "user"), default=default.instruction_role,
                           help="where a query's task instruction goes: the system message, or before the text in the "
                                "user turn")
        group.add_argument("--screenshot-content-order", choices=("text-first", "image-first"),
                           default=default.content_order, help="the order of a composed item's text and image in the "
                                                               "user turn")
        group.add_argument("--screenshot-candidate-instruction", default=default.candidate_instruction, metavar="TEXT",
                           help="a system message for candidates; None: the chat template's default system line")
        group.add_argument("--screenshot-no-generation-prompt", action="store_true",
                           help="end prompts after the user turn, not after the assistant turn's opening (whose "
                                "last token is pooled by default)")
        group.add_argument("--screenshot-min-pixels", type=int, default=None, metavar="N",
                           help="the images' smallest area after resizing; None: the checkpoint's "
                                "preprocessor_config.json")
        group.add_argument("--screenshot-max-pixels", type=int, default=None, metavar="N",
                           help="the images' largest area after resizing: the main speed and memory knob, which changes "
                                "the embeddings; None: the checkpoint's preprocessor_config.json")

    def check_export_options(self, spec: ModelSpec, options: ExportOptions) -> None:
        super().check_export_options(spec, options)
        low, high = (options.family_options.get(f"screenshot_{n}_pixels") for n in ("min", "max"))
        if any(b is not None and b < 28 * 28 for b in (low, high)) or (low is not None and high is not None and low > high):
            raise BgevlError(f"--screenshot-min-pixels {low} / --screenshot-max-pixels {high}: each at least 784 (one "
                             f"28x28 merge block) and min at most max")

    def prepare_export(self, path: Path, spec: ModelSpec, options: ExportOptions) -> ExportedModel:
        from bgevl.families.screenshot.checkpoint import check_processor
        from bgevl.families.screenshot.graphs import screenshot_graph_specs
        from bgevl.families.screenshot.layout import VisionGeometry
        from bgevl.families.screenshot.preprocessing import ScreenshotPreprocessor, ScreenshotPrompts

        model, processor = self.load(path, spec, options.attn_implementation)
        config = model.config
        check_processor(processor, config, path)
        assert options.opt_batch is not None and options.max_batch is not None
        chosen = options.family_options
        processor.set_pixel_bounds(chosen.get("screenshot_min_pixels"), chosen.get("screenshot_max_pixels"))
        min_pixels, max_pixels = processor.pixel_bounds
        graphs = screenshot_graph_specs(config, max_pixels=max_pixels, opt_batch=options.opt_batch,
                                        max_batch=options.max_batch, max_sequence=options.max_sequence_length)
        geometry = VisionGeometry.from_config(config.vision_config)
        default = ScreenshotPrompts()  # the declaration's defaults where an option was not given
        prompts = ScreenshotPrompts(
            instruction_role=chosen.get("screenshot_instruction_role", default.instruction_role),
            candidate_instruction=chosen.get("screenshot_candidate_instruction", default.candidate_instruction),
            content_order=chosen.get("screenshot_content_order", default.content_order),
            add_generation_prompt=not chosen.get("screenshot_no_generation_prompt", not default.add_generation_prompt))
        hidden = int(config.text_config.hidden_size)
        parameters = sum(p.numel() for p in model.model.parameters())
        return ExportedModel(
            model, processor, graphs, ScreenshotPreprocessor(processor, geometry, prompts, options.max_sequence_length,
                                                             token_budget=SCREENSHOT_TOKEN_BUDGET),
            embedding_dim=hidden, max_text_length=int(options.max_sequence_length), parameters=int(parameters),
            recipe={"vision_geometry": geometry.to_json(), "prompts": prompts.to_json(),
                    "default_query_instruction": SCREENSHOT_QUERY_INSTRUCTION, "hidden_size": hidden,
                    "pixel_bounds": {"min_pixels": min_pixels, "max_pixels": max_pixels},
                    "token_budget": SCREENSHOT_TOKEN_BUDGET,
                    "padding_side": processor.tokenizer.padding_side},
            summary=f"{parameters / 1e6:.1f}M parameters without the LM head, embedding dim {hidden}, pixels "
                    f"{min_pixels}..{max_pixels}, tokenizer padding side {processor.tokenizer.padding_side}")

    def graph_modules(self, exported: ExportedModel) -> dict[str, torch.nn.Module]:
        from bgevl.families.screenshot.modules import ScreenshotLanguage, ScreenshotVision

        return {SCREENSHOT_VISION_GRAPH: ScreenshotVision(exported.model).eval(),
                SCREENSHOT_LANGUAGE_GRAPH: ScreenshotLanguage(exported.model).eval()}

    def example_feeds(self, graphs: Mapping[str, GraphSpec], modules: Mapping[str, torch.nn.Module],
                      requests: Sequence[Feeds]) -> dict[str, Feeds]:
        """The first image of a request whose first two items have images; the language graph's example is those
        two items, with the vision module's output on their images (the first in the batch's image order)."""
        import torch

        example = next((f for f in requests if IMAGE_TOKEN_COUNTS in f and (f[IMAGE_FEATURE_INDEX][:2] >= 0).any(axis=1).all()),
                       None)
        if example is None:
            raise ValueError("no validation request starts with two items that have images (the screenshot family's "
                             "validation_requests put the images first)")
        with torch.inference_mode():
            features = modules[SCREENSHOT_VISION_GRAPH](*(torch.from_numpy(example[n]) for n in VISION_INPUTS)).numpy()
        first = int(example[IMAGE_TOKEN_COUNTS][0])
        vision = {n: example[n][:first] for n in VISION_INPUTS}
        language = {n: example[n][:2] for n in (INPUT_IDS, ATTENTION_MASK, IMAGE_FEATURE_INDEX)}
        language[ROPE_POSITIONS] = example[ROPE_POSITIONS][:, :2]
        language[IMAGE_FEATURES] = features[example[IMAGE_RESTORE]][:int(language[IMAGE_FEATURE_INDEX].max()) + 1]
        return {SCREENSHOT_VISION_GRAPH: vision, SCREENSHOT_LANGUAGE_GRAPH: language}

    def validation_requests(self, probes: ProbeSet) -> list[Request]:
        """Image-only and text-only candidates, composed and text-only queries with the usage example's
        instruction, images of the probe set's different sizes in each request."""
        n = len(probes.images)
        requests = []
        for start in range(0, n, VALIDATION_BATCH // 2):
            part = range(start, min(n, start + VALIDATION_BATCH // 2))
            requests.append(Request([probes.images[i] for i in part] + [None] * len(part),
                                    [None] * len(part) + [probes.texts[i] for i in part], CANDIDATE))
            requests.append(Request([probes.images[probes.composed[i][0]] for i in part] + [None] * len(part),
                                    [probes.texts[probes.composed[i][1]] for i in part] + [probes.texts[(i + 2) % n] for i in part],
                                    QUERY, SCREENSHOT_QUERY_INSTRUCTION))
        return requests

    # --- the embedding recipe ----------------------------------------------------------
    def steps(self, feeds: Feeds, graphs: Mapping[str, GraphSpec]) -> Steps:
        """The vision graph once per image (concurrent calls: each image has its own number of tokens), its
        outputs put back in raster order, then the language graph on the batch."""
        if IMAGE_TOKEN_COUNTS in feeds:
            bounds = np.cumsum([0, *feeds[IMAGE_TOKEN_COUNTS].tolist()])
            outputs = yield [Call(SCREENSHOT_VISION_GRAPH, {n: feeds[n][a:b] for n in VISION_INPUTS}, (IMAGE_FEATURES,))
                             for a, b in zip(bounds[:-1], bounds[1:])]
            features = np.concatenate([np.asarray(o[IMAGE_FEATURES], np.float32) for o in outputs])[feeds[IMAGE_RESTORE]]
        else:
            hidden = graphs[SCREENSHOT_LANGUAGE_GRAPH].input(IMAGE_FEATURES).shape[1]
            assert isinstance(hidden, int)
            features = np.zeros((1, hidden), np.float32)
        language = {n: feeds[n] for n in (INPUT_IDS, ATTENTION_MASK, ROPE_POSITIONS, IMAGE_FEATURE_INDEX)}
        language[IMAGE_FEATURES] = features
        (out,) = yield [Call(SCREENSHOT_LANGUAGE_GRAPH, language, (EMBEDDING,))]
        return out[EMBEDDING]

    def open_preprocessor(self, processor_dir: Path, recipe: Mapping[str, Any], max_text_length: int,
                          limits: InputLimits, text_overflow: str = "truncate", token_budget: int | None = None,
                          **options: Any) -> Preprocessor:
        """``token_budget``: the most tokens of one batch (default the manifest's). ``text_overflow`` does not
        apply: an over-long prompt is refused (truncation would cut the image tokens or the final token the
        embedding is read from)."""
        from bgevl.families.screenshot.layout import VisionGeometry
        from bgevl.families.screenshot.preprocessing import ScreenshotPreprocessor, ScreenshotPrompts
        from bgevl.families.screenshot.processor import ImageTextQwenProcessor

        if options:
            raise TypeError(f"unexpected options for a screenshot export: {', '.join(options)}")
        bounds = recipe["pixel_bounds"]
        processor = ImageTextQwenProcessor.from_directory(processor_dir, min_pixels=bounds["min_pixels"],
                                                          max_pixels=bounds["max_pixels"])
        return ScreenshotPreprocessor(processor, VisionGeometry(**recipe["vision_geometry"]),
                                      ScreenshotPrompts.from_json(recipe["prompts"]), max_text_length, limits,
                                      token_budget=token_budget or recipe.get("token_budget"))

    # --- benchmarks --------------------------------------------------------------------
    def torch_baseline(self, checkpoint: Path, threads: int) -> TorchBaseline:
        from bgevl.families.screenshot.bench import ScreenshotBaseline

        return ScreenshotBaseline(self, checkpoint, threads)
