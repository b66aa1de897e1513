"""CLIP preprocessing: IMAGE (encoded image bytes) -> pixel_values, TEXT (UTF-8) -> input_ids and
attention_mask padded to the model's text limit, with the checkpoint's own processor files
(``1/processor/``) and the runtime's ``ClipPreprocessor`` (same checks, same error messages).
Either input may be absent; only the outputs of the inputs present are returned.
"""

from __future__ import annotations

from pathlib import Path

import triton_python_backend_utils as pb

from bgevl.runtime.preprocessing import ClipPreprocessor, InputLimits
from bgevl.specs import ATTENTION_MASK, INPUT_IDS, PIXEL_VALUES, SERVING_IMAGE, SERVING_TEXT
from bgevl.triton_repo.models.backend_utils import (
    answer, decode_bytes, decode_text, error_response, model_config, optional_input, parameter,
)


class TritonPythonModel:
    def initialize(self, args):
        config = model_config(args)
        self.name = config["name"]
        processor_dir = Path(args["model_repository"]) / args["model_version"] / "processor"
        self.preprocessor = ClipPreprocessor.from_pretrained(
            processor_dir, int(parameter(config, "max_text_length")), parameter(config, "text_overflow", "truncate"),
            InputLimits.from_parameters(lambda key, default: parameter(config, key, default)))

    def execute(self, requests):
        return [answer(self.name, self._one, r) for r in requests]

    def _one(self, request):
        images, texts = optional_input(request, SERVING_IMAGE), optional_input(request, SERVING_TEXT)
        if images is None and texts is None:
            return error_response(f"send {SERVING_TEXT}, {SERVING_IMAGE} or both (BYTES tensors of shape [batch, 1])")
        outputs = []
        if images is not None:
            pixels = self.preprocessor.pixel_values(decode_bytes(images, SERVING_IMAGE))
            outputs.append(pb.Tensor(PIXEL_VALUES, pixels))
        if texts is not None:
            tokens = self.preprocessor.tokens(decode_text(texts, SERVING_TEXT), pad_to_max_length=True)
            outputs += [pb.Tensor(INPUT_IDS, tokens[INPUT_IDS]), pb.Tensor(ATTENTION_MASK, tokens[ATTENTION_MASK])]
        return pb.InferenceResponse(output_tensors=outputs)
