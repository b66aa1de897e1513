"""MLLM preprocessing for one request: IMAGE / TEXT (BYTES [n], either optional), INSTRUCTION and
ROLE (BYTES [1], optional) -> input_ids, attention_mask, image_feature_index and (when there are
images) image_tiles, with the checkpoint's LlavaNextProcessor (``1/processor/``) and the
runtime's ``MllmPreprocessor`` (BGE-VL's prompts, anyres layout, same errors).

Served with ``max_batch_size: 0``: the outputs are not aligned on one batch axis (``image_tiles``
counts tiles, the rest items).
"""

from __future__ import annotations

import json
from pathlib import Path

import triton_python_backend_utils as pb

from bgevl.errors import InputError
from bgevl.runtime.mllm_preprocessing import ImageLayout, MllmPreprocessor
from bgevl.runtime.preprocessing import InputLimits
from bgevl.specs import (
    ATTENTION_MASK, IMAGE_FEATURE_INDEX, IMAGE_TILES, INPUT_IDS, SERVING_IMAGE, SERVING_INSTRUCTION, SERVING_ROLE,
    SERVING_TEXT,
)
from bgevl.triton_repo.models.backend_utils import (
    answer, decode_bytes, decode_text, error_response, model_config, optional_input, parameter,
)


class TritonPythonModel:
    def initialize(self, args):
        config = model_config(args)
        self.name = config["name"]
        processor_dir = Path(args["model_repository"]) / args["model_version"] / "processor"
        resize = json.loads(parameter(config, "image_resize", "null"))
        self.preprocessor = MllmPreprocessor.from_pretrained(
            processor_dir, ImageLayout.from_json(json.loads(parameter(config, "image_layout"))),
            int(parameter(config, "max_sequence_length")), resize,
            InputLimits.from_parameters(lambda key, default: parameter(config, key, default)))

    def execute(self, requests):
        return [answer(self.name, self._one, r) for r in requests]

    def _one(self, request):
        images, texts = optional_input(request, SERVING_IMAGE), optional_input(request, SERVING_TEXT)
        instruction, role = optional_input(request, SERVING_INSTRUCTION), optional_input(request, SERVING_ROLE)
        if images is None and texts is None:
            return error_response(f"send {SERVING_TEXT}, {SERVING_IMAGE} or both (BYTES tensors of shape [batch, 1])")
        image_list = decode_bytes(images, SERVING_IMAGE) if images is not None else None
        text_list = decode_text(texts, SERVING_TEXT) if texts is not None else None
        if image_list is not None and text_list is not None and len(image_list) != len(text_list):
            raise InputError(f"{SERVING_IMAGE} has {len(image_list)} items and {SERVING_TEXT} {len(text_list)}; "
                             f"composed items pair them one to one")
        instruction_text = decode_text(instruction, SERVING_INSTRUCTION)[0] if instruction is not None else None
        role_text = decode_text(role, SERVING_ROLE)[0] if role is not None else (
            "query" if instruction_text is not None else "candidate")
        feeds = self.preprocessor(image_list, text_list, role_text, instruction_text)
        names = [INPUT_IDS, ATTENTION_MASK, IMAGE_FEATURE_INDEX] + ([IMAGE_TILES] if IMAGE_TILES in feeds else [])
        return pb.InferenceResponse(output_tensors=[pb.Tensor(n, feeds[n]) for n in names])
