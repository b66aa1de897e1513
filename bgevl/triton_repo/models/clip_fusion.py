"""Score fusion: unnormalized image and text features -> normalized composed embedding
(``bgevl.fusion.score_fusion``, the runtime's implementation). Requests batched by Triton run as
one array operation."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb

from bgevl.fusion import score_fusion
from bgevl.specs import IMAGE_FEATURES, SERVING_EMBEDDING, TEXT_FEATURES
from bgevl.triton_repo.models.backend_utils import error_response


class TritonPythonModel:
    def execute(self, requests):
        image = [pb.get_input_tensor_by_name(r, IMAGE_FEATURES).as_numpy() for r in requests]
        text = [pb.get_input_tensor_by_name(r, TEXT_FEATURES).as_numpy() for r in requests]
        try:
            fused = score_fusion(np.concatenate(image), np.concatenate(text))
        except ValueError as exc:
            return [error_response(str(exc)) for _ in requests]
        bounds = np.cumsum([0] + [len(a) for a in image])
        return [pb.InferenceResponse(output_tensors=[pb.Tensor(SERVING_EMBEDDING, fused[bounds[i]:bounds[i + 1]])])
                for i in range(len(requests))]
