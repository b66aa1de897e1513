"""The preprocess model of every repository: the family's serving inputs -> the feeds of its recipe.

IMAGE (encoded image bytes), TEXT (UTF-8), TRUNCATE (NONE, END, START; optional) and, for families that take
them, INSTRUCTION and ROLE (one value per request) become a ``bgevl.core.family.Request``, which the family's own
preprocessor (``Family.open_preprocessor`` on the checkpoint's processor files in ``1/processor/``,
the runtime's code: same checks, same error messages) turns into feeds, with fixed shapes where the
family's serving needs them. Either of IMAGE and TEXT may be absent; only the outputs of the
inputs present are returned.
"""

from __future__ import annotations

import json
from pathlib import Path

import triton_python_backend_utils as pb

from bgevl.core.errors import InputError
from bgevl.core.registry import get_family
from bgevl.core.family import Request
from bgevl.core.preprocessing import InputLimits, one_value_per_request
from bgevl.core.specs import SERVING_IMAGE, SERVING_INSTRUCTION, SERVING_ROLE, SERVING_TEXT, SERVING_TRUNCATE
from bgevl.serving.models.backend_utils import (
    answer, decode_bytes, decode_text, error_response, model_config, optional_input, parameter,
)


class TritonPythonModel:
    def initialize(self, args):
        config = model_config(args)
        self.name = config["name"]
        processor_dir = Path(args["model_repository"]) / args["model_version"] / "processor"
        family = get_family(parameter(config, "family"))
        self.preprocessor = family.open_preprocessor(
            processor_dir, json.loads(parameter(config, "recipe", "{}")), int(parameter(config, "max_text_length")),
            InputLimits.from_parameters(lambda key, default: parameter(config, key, default)),
            **json.loads(parameter(config, "options", "{}")))
        self.outputs = [o["name"] for o in config["output"]]

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
        truncate = optional_input(request, SERVING_TRUNCATE)
        request_ = Request(image_list, text_list,
                           decode_text(role, SERVING_ROLE)[0] if role is not None else None,
                           decode_text(instruction, SERVING_INSTRUCTION)[0] if instruction is not None else None,
                           decode_text(one_value_per_request(truncate, SERVING_TRUNCATE))[0] if truncate is not None else None)
        feeds = self.preprocessor.prepare(self.preprocessor.admit(request_), serving=True)
        return pb.InferenceResponse(output_tensors=[pb.Tensor(n, feeds[n]) for n in self.outputs if n in feeds])
