"""An exported ONNX graph served by the python backend with ONNX Runtime (CPU-only Triton).

With ``max_batch_size > 0`` the requests Triton's dynamic batcher hands over in one ``execute``
are concatenated along the batch axis and run as one ONNX Runtime call, then split back; graphs
served with ``max_batch_size: 0`` (the MLLM language graph) run one request per call.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb

from bgevl.runtime.providers import create_session
from bgevl.triton_repo.models.backend_utils import error_response, model_config, parameter


class TritonPythonModel:
    def initialize(self, args):
        self.config = model_config(args)
        version_dir = Path(args["model_repository"]) / args["model_version"]
        threads = int(parameter(self.config, "intra_op_threads", "0")) or None
        self.session = create_session(version_dir / parameter(self.config, "onnx_file", "model.onnx"), None, threads)
        self.inputs = [i["name"] for i in self.config["input"]]
        self.outputs = [o["name"] for o in self.config["output"]]
        self.batched = int(self.config.get("max_batch_size", 0)) > 0
        # Requests arrive padded to the model's text limit (fixed shapes let Triton merge them); with
        # right padding and a causal, mask-pooled graph (CLIP text) the columns after the longest
        # text in the merged batch change nothing, so they are cut before running.
        self.trim_by = parameter(self.config, "trim_right_padding")

    def _requested(self, request) -> list[str]:
        names = list(request.requested_output_names())
        return names or self.outputs

    def execute(self, requests):
        if not self.batched:
            return [self._run_one(r) for r in requests]
        wanted = sorted({n for r in requests for n in self._requested(r)})
        feeds = {name: [pb.get_input_tensor_by_name(r, name).as_numpy() for r in requests] for name in self.inputs}
        sizes = [len(a) for a in feeds[self.inputs[0]]]
        merged = {k: np.concatenate(v) for k, v in feeds.items()}
        if self.trim_by:
            length = max(int(merged[self.trim_by].sum(axis=1).max()), 1)
            merged = {k: v[:, :length] if v.ndim == 2 and v.shape == merged[self.trim_by].shape else v
                      for k, v in merged.items()}
        try:
            results = self.session.run(wanted, merged)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime's message goes back to the client
            return [error_response(f"{self.config['name']}: {exc}") for _ in requests]
        bounds = np.cumsum([0] + sizes)
        responses = []
        for i, request in enumerate(requests):
            names = self._requested(request)
            responses.append(pb.InferenceResponse(output_tensors=[
                pb.Tensor(n, np.ascontiguousarray(results[wanted.index(n)][bounds[i]:bounds[i + 1]])) for n in names]))
        return responses

    def _run_one(self, request):
        names = self._requested(request)
        feed = {name: pb.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}
        try:
            results = self.session.run(names, feed)
        except Exception as exc:  # noqa: BLE001
            return error_response(f"{self.config['name']}: {exc}")
        return pb.InferenceResponse(output_tensors=[pb.Tensor(n, r) for n, r in zip(names, results)])
