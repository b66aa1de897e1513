"""Score fusion: unnormalized image and text features -> normalized composed embedding
(``bgevl.families.dual_encoder.fusion.score_fusion``, the runtime's implementation). Requests batched by Triton run as
one array operation."""

from __future__ import annotations

from typing import Any

import numpy as np
import triton_python_backend_utils as pb

from bgevl.core.errors import InputError
from bgevl.families.dual_encoder.fusion import score_fusion
from bgevl.families.dual_encoder.graphs import IMAGE_FEATURES, TEXT_FEATURES
from bgevl.core.specs import SERVING_EMBEDDING
from bgevl.serving.models.backend_utils import answer, model_config


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.name = model_config(args)["name"]

    def execute(self, requests: list[Any]) -> list[Any]:
        """One array operation for the batch; if it fails, each request alone (a bad one fails by itself)."""
        try:
            image = [pb.get_input_tensor_by_name(r, IMAGE_FEATURES).as_numpy() for r in requests]
            text = [pb.get_input_tensor_by_name(r, TEXT_FEATURES).as_numpy() for r in requests]
            if any(len(a) != len(b) for a, b in zip(image, text)):  # merged, two such requests could pair wrongly
                raise InputError("a request's image and text features differ in count")
            fused = score_fusion(np.concatenate(image), np.concatenate(text))
        except Exception:  # noqa: BLE001
            return [answer(self.name, self._one, r) for r in requests]
        bounds = np.cumsum([0] + [len(a) for a in image])
        return [pb.InferenceResponse(output_tensors=[pb.Tensor(SERVING_EMBEDDING, fused[bounds[i]:bounds[i + 1]])])
                for i in range(len(requests))]

    def _one(self, request: Any) -> Any:
        image = pb.get_input_tensor_by_name(request, IMAGE_FEATURES).as_numpy()
        text = pb.get_input_tensor_by_name(request, TEXT_FEATURES).as_numpy()
        if image.shape != text.shape:
            raise InputError(f"{IMAGE_FEATURES} {list(image.shape)} and {TEXT_FEATURES} {list(text.shape)} differ in shape")
        return pb.InferenceResponse(output_tensors=[pb.Tensor(SERVING_EMBEDDING, score_fusion(image, text))])
