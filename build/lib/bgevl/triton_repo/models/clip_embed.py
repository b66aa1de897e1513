"""The entry model of a CLIP repository: TEXT and/or IMAGE (BYTES) -> EMBEDDING.

It orchestrates the other models with BLS (business logic scripting) rather than being a
``platform: "ensemble"``: Triton 2.51's ensemble scheduler runs every step and rejects a step
whose input tensor was not produced ("expected 1 inputs but got 0"), so one ensemble cannot take
text *or* image *or* both. Here each request runs only the steps its inputs need:

* IMAGE -> preprocess -> vision encoder -> ``image_embeds``;
* TEXT -> preprocess -> text encoder -> ``text_embeds``;
* both -> preprocess -> both encoders (concurrently) -> fusion model (score fusion).

The requests of one ``execute`` are processed concurrently (``async_exec``), so the encoders'
dynamic batchers see them together and merge them. The fixed-input ``<name>_composed`` model is
a true Triton ensemble of the same steps.
"""

from __future__ import annotations

import asyncio

import triton_python_backend_utils as pb

from bgevl.specs import (
    ATTENTION_MASK, IMAGE_EMBEDS, IMAGE_FEATURES, INPUT_IDS, PIXEL_VALUES, SERVING_EMBEDDING, SERVING_IMAGE,
    SERVING_TEXT, TEXT_EMBEDS, TEXT_FEATURES,
)
from bgevl.triton_repo.models.backend_utils import answer_async, call, error_response, model_config, optional_input, parameter


class TritonPythonModel:
    def initialize(self, args):
        config = model_config(args)
        self.name = config["name"]
        self.preprocess = parameter(config, "preprocess_model")
        self.vision = parameter(config, "vision_model")
        self.text = parameter(config, "text_model")
        self.fusion = parameter(config, "fusion_model")

    async def execute(self, requests):
        return await asyncio.gather(*(answer_async(self.name, self._one, r) for r in requests))

    async def _one(self, request):
        images, texts = optional_input(request, SERVING_IMAGE), optional_input(request, SERVING_TEXT)
        if images is None and texts is None:
            return error_response(f"send {SERVING_TEXT}, {SERVING_IMAGE} or both (BYTES tensors of shape [batch, 1])")
        feeds, wanted = {}, []
        if images is not None:
            feeds[SERVING_IMAGE] = images
            wanted.append(PIXEL_VALUES)
        if texts is not None:
            feeds[SERVING_TEXT] = texts
            wanted += [INPUT_IDS, ATTENTION_MASK]
        pre = await call(self.preprocess, feeds, wanted, input_errors=True)
        if texts is None:
            out = (await call(self.vision, {PIXEL_VALUES: pre[PIXEL_VALUES]}, [IMAGE_EMBEDS]))[IMAGE_EMBEDS]
        elif images is None:
            tokens = {INPUT_IDS: pre[INPUT_IDS], ATTENTION_MASK: pre[ATTENTION_MASK]}
            out = (await call(self.text, tokens, [TEXT_EMBEDS]))[TEXT_EMBEDS]
        else:
            tokens = {INPUT_IDS: pre[INPUT_IDS], ATTENTION_MASK: pre[ATTENTION_MASK]}
            image, text = await asyncio.gather(call(self.vision, {PIXEL_VALUES: pre[PIXEL_VALUES]}, [IMAGE_FEATURES]),
                                               call(self.text, tokens, [TEXT_FEATURES]))
            fused = await call(self.fusion, {IMAGE_FEATURES: image[IMAGE_FEATURES], TEXT_FEATURES: text[TEXT_FEATURES]},
                               [SERVING_EMBEDDING])
            out = fused[SERVING_EMBEDDING]
        return pb.InferenceResponse(output_tensors=[pb.Tensor(SERVING_EMBEDDING, out)])
