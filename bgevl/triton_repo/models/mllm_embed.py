"""The entry model of an MLLM repository: TEXT and/or IMAGE (BYTES [batch, 1]), optional
INSTRUCTION and ROLE (BYTES [batch, 1], one value per request) -> EMBEDDING.

BLS orchestration (see ``clip_embed`` for why not a ``platform: "ensemble"``): preprocess ->
vision graph on the image tiles (skipped for text-only requests, which get the one all-zero tile
the language graph expects) -> pooled language graph. Requests of one ``execute`` run
concurrently, so the vision graph's dynamic batcher merges their tiles.
"""

from __future__ import annotations

import asyncio

import numpy as np
import triton_python_backend_utils as pb

from bgevl.errors import InputError
from bgevl.specs import (
    ATTENTION_MASK, EMBEDDING, IMAGE_FEATURE_INDEX, IMAGE_TILES, INPUT_IDS, SERVING_EMBEDDING, SERVING_IMAGE,
    SERVING_INSTRUCTION, SERVING_ROLE, SERVING_TEXT, TILE_FEATURES,
)
from bgevl.triton_repo.models.backend_utils import answer_async, call, error_response, model_config, optional_input, parameter


def _one_value(values: np.ndarray | None, name: str):
    """INSTRUCTION / ROLE arrive per item ([batch, 1]); the prompt takes one value per request."""
    if values is None:
        return None
    flat = values.reshape(-1)
    if any(v != flat[0] for v in flat[1:]):
        raise InputError(f"{name} differs between the items of one request; send one request per {name.lower()}")
    return flat[:1]


class TritonPythonModel:
    def initialize(self, args):
        config = model_config(args)
        self.name = config["name"]
        self.preprocess = parameter(config, "preprocess_model")
        self.vision = parameter(config, "vision_model")
        self.language = parameter(config, "language_model")
        tile_tokens, hidden = int(parameter(config, "tile_tokens")), int(parameter(config, "hidden_size"))
        self.no_image = np.zeros((1, tile_tokens, hidden), dtype=np.float32)

    async def execute(self, requests):
        return await asyncio.gather(*(answer_async(self.name, self._one, r) for r in requests))

    async def _one(self, request):
        feeds = {}
        for name in (SERVING_IMAGE, SERVING_TEXT):
            values = optional_input(request, name)
            if values is not None:
                feeds[name] = values.reshape(-1)
        for name in (SERVING_INSTRUCTION, SERVING_ROLE):
            value = _one_value(optional_input(request, name), name)
            if value is not None:
                feeds[name] = value
        if SERVING_IMAGE not in feeds and SERVING_TEXT not in feeds:
            return error_response(f"send {SERVING_TEXT}, {SERVING_IMAGE} or both (BYTES tensors of shape [batch, 1])")
        wanted = [INPUT_IDS, ATTENTION_MASK, IMAGE_FEATURE_INDEX] + ([IMAGE_TILES] if SERVING_IMAGE in feeds else [])
        pre = await call(self.preprocess, feeds, wanted, input_errors=True)
        if IMAGE_TILES in pre:
            tiles = (await call(self.vision, {IMAGE_TILES: pre[IMAGE_TILES]}, [TILE_FEATURES]))[TILE_FEATURES]
        else:
            tiles = self.no_image
        language = {INPUT_IDS: pre[INPUT_IDS], ATTENTION_MASK: pre[ATTENTION_MASK], TILE_FEATURES: tiles,
                    IMAGE_FEATURE_INDEX: pre[IMAGE_FEATURE_INDEX]}
        out = (await call(self.language, language, [EMBEDDING]))[EMBEDDING]
        return pb.InferenceResponse(output_tensors=[pb.Tensor(SERVING_EMBEDDING, out)])
