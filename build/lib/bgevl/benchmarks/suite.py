"""What the benchmark runs: workloads (inputs per batch size) and the backends that embed them.

Two levels, never mixed in one ratio:

* **model** level: preprocessed tensors in, embeddings out. PyTorch eager (transformers'
  ``CLIPModel`` / ``LlavaNextModel`` with its default SDPA attention, what a user would run
  otherwise) against ONNX Runtime on the fp32/fp16/int8 exports (and the CUDA/TensorRT
  providers or TensorRT engines where present). ``x vs PyTorch`` is measured here.
* **end-to-end** level: encoded image files and strings in, embeddings out, preprocessing
  included: ``bgevl.runtime`` (fp32 export) against the Triton server of the Triton issue
  (python-backend ONNX Runtime encoders on CPU). Triton's overhead is measured here.

Inputs are synthetic (``bgevl.probes``: varied sizes and aspect ratios, captions of varied
length); with random-weight checkpoints the speed of the architectures is what is measured.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bgevl.fusion import l2_normalize, score_fusion
from bgevl.probes import PROBE_TEXTS, synthetic_images
from bgevl.specs import (
    EMBEDDING, IMAGE_EMBEDS, IMAGE_FEATURE_INDEX, IMAGE_FEATURES, IMAGE_TILES, MLLM_LANGUAGE_GRAPH, MLLM_VISION_GRAPH,
    TEXT_EMBEDS, TEXT_FEATURES, TEXT_GRAPH, TILE_FEATURES, VISION_GRAPH,
)

WORKLOADS = ("image", "text", "composed")
BENCH_SEED = 424242


@dataclass
class Case:
    """One (workload, batch size): raw inputs, the model-level feeds and the FLOPs of one call."""

    model: str
    workload: str
    batch: int
    images: list[bytes] | None
    texts: list[str] | None
    feeds: dict[str, Any] = field(default_factory=dict)
    gflop: float = float("nan")


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def raw_inputs(workload: str, batch: int) -> tuple[list[bytes] | None, list[str] | None]:
    images = [_png(im) for im in synthetic_images(batch, BENCH_SEED)] if workload in ("image", "composed") else None
    texts = [PROBE_TEXTS[i % len(PROBE_TEXTS)] for i in range(batch)] if workload in ("text", "composed") else None
    return images, texts


# --- CLIP -------------------------------------------------------------------------------

class ClipModel:
    """The checkpoint of one CLIP model: its processor for the feeds and torch modules for the baseline."""

    family = "clip"

    def __init__(self, checkpoint: Path, threads: int):
        import torch

        from bgevl.checkpoints import load_clip
        from bgevl.export.clip_modules import graph_modules
        from bgevl.runtime.preprocessing import ClipPreprocessor

        torch.set_num_threads(threads)
        model, processor = load_clip(checkpoint, attn_implementation="sdpa")
        self.modules = graph_modules(model)
        self.preprocessor = ClipPreprocessor(processor, model.config.text_config.max_position_embeddings)

    def case(self, key: str, workload: str, batch: int) -> Case:
        images, texts = raw_inputs(workload, batch)
        case = Case(key, workload, batch, images, texts)
        if images is not None:
            case.feeds[VISION_GRAPH] = {"pixel_values": self.preprocessor.pixel_values(images)}
        if texts is not None:
            case.feeds[TEXT_GRAPH] = self.preprocessor.tokens(texts)
        case.gflop = self._gflop(case)
        return case

    def _gflop(self, case: Case) -> float:
        """FLOPs of one call from torch's own counter (matmuls, convolutions, attention) on the
        baseline modules, which compute what the exported graphs compute; counted at batch 1
        (same padded length) and scaled, so large batches need not run under the counter."""
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        total = 0
        with torch.inference_mode():
            for graph, feed in case.feeds.items():
                one = [torch.from_numpy(v[:1]) for v in feed.values()]
                with FlopCounterMode(display=False) as counter:
                    self.modules[graph](*one)
                total += counter.get_total_flops() * case.batch
        return total / 1e9

    def torch_call(self, case: Case) -> Callable[[], np.ndarray]:
        import torch

        tensors = {g: [torch.from_numpy(v) for v in feed.values()] for g, feed in case.feeds.items()}

        def call() -> np.ndarray:
            with torch.inference_mode():
                out = {g: self.modules[g](*t) for g, t in tensors.items()}
            if case.workload == "image":
                return out[VISION_GRAPH][0].numpy()
            if case.workload == "text":
                return out[TEXT_GRAPH][0].numpy()
            return score_fusion(out[VISION_GRAPH][1].numpy(), out[TEXT_GRAPH][1].numpy())
        return call

    @staticmethod
    def graphs_call(graphs: dict, case: Case) -> Callable[[], np.ndarray]:
        """The exported graphs (ONNX Runtime or TensorRT) on the same feeds."""
        def call() -> np.ndarray:
            if case.workload == "image":
                return graphs[VISION_GRAPH].run_whole(case.feeds[VISION_GRAPH], [IMAGE_EMBEDS])[0]
            if case.workload == "text":
                return graphs[TEXT_GRAPH].run_whole(case.feeds[TEXT_GRAPH], [TEXT_EMBEDS])[0]
            image = graphs[VISION_GRAPH].run_whole(case.feeds[VISION_GRAPH], [IMAGE_FEATURES])[0]
            text = graphs[TEXT_GRAPH].run_whole(case.feeds[TEXT_GRAPH], [TEXT_FEATURES])[0]
            return score_fusion(image, text)
        return call


# --- MLLM -------------------------------------------------------------------------------

class MllmModel:
    """LLaVA-NeXT embedder: queries (text, composed) carry BGE-VL's CIR instruction; images are candidates."""

    family = "mllm"

    def __init__(self, checkpoint: Path, threads: int, max_sequence: int):
        import torch

        from bgevl.checkpoints import load_mllm
        from bgevl.runtime.mllm_preprocessing import ImageLayout, MllmPreprocessor

        torch.set_num_threads(threads)
        self.model, self.processor = load_mllm(checkpoint, attn_implementation="sdpa")
        self.layout = ImageLayout.from_config(self.model.config)
        self.preprocessor = MllmPreprocessor(self.processor, self.layout, max_sequence)
        self.hidden = int(self.model.config.text_config.hidden_size)

    def case(self, key: str, workload: str, batch: int) -> Case:
        from bgevl.runtime.mllm_preprocessing import CIR_INSTRUCTION

        images, texts = raw_inputs(workload, batch)
        role, instruction = ("candidate", None) if workload == "image" else ("query", CIR_INSTRUCTION)
        case = Case(key, workload, batch, images, texts)
        case.feeds["graphs"] = self.preprocessor(images, texts, role, instruction)
        prompts = self.preprocessor.prompts(images, texts, role, instruction)
        pil = self.preprocessor.load_images(images) if images else None
        case.feeds["processor"] = dict(self.processor(text=prompts, images=pil, padding=True, return_tensors="np"))
        case.feeds["role"], case.feeds["instruction"] = role, instruction
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            self.torch_call(case)()
        case.gflop = counter.get_total_flops() / 1e9
        return case

    def torch_call(self, case: Case) -> Callable[[], np.ndarray]:
        from bgevl.export.mllm_modules import reference_embeddings

        return lambda: reference_embeddings(self.model, case.feeds["processor"])

    def graphs_call(self, graphs: dict, case: Case) -> Callable[[], np.ndarray]:
        feeds = case.feeds["graphs"]
        zero_tile = np.zeros((1, self.layout.tile_tokens, self.hidden), np.float32)

        def call() -> np.ndarray:
            if IMAGE_TILES in feeds:
                tiles = graphs[MLLM_VISION_GRAPH].run_whole({IMAGE_TILES: feeds[IMAGE_TILES]}, [TILE_FEATURES])[0]
            else:
                tiles = zero_tile
            language = {k: feeds[k] for k in ("input_ids", "attention_mask", IMAGE_FEATURE_INDEX)}
            language[TILE_FEATURES] = np.asarray(tiles, np.float32)
            return graphs[MLLM_LANGUAGE_GRAPH].run_whole(language, [EMBEDDING])[0]
        return call


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(l2_normalize(a) * l2_normalize(b), axis=-1)))
