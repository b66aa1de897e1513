"""An exported ONNX graph served by the python backend with ONNX Runtime, or OpenVINO (CPU-only Triton).

With ``max_batch_size > 0`` the requests Triton's dynamic batcher hands over in one ``execute``
are concatenated along the batch axis and run as one ONNX Runtime call, then split back (requests
of other shapes in separate calls; a failing call is retried request by request, so one bad request
fails alone); graphs served with ``max_batch_size: 0`` (the MLLM language graph) run one request
per call.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb

from bgevl.core.errors import InputError
from bgevl.runtime.providers import create_session
from bgevl.core.specs import GraphSpec
from bgevl.serving.models.backend_utils import answer, error_response, model_config, parameter


class OpenVinoSession:
    """The graph compiled by OpenVINO for the CPU, with ONNX Runtime's ``run(names, feed)`` (``engine:
    openvino`` in the config's parameters; ``bgevl.runtime.openvino``)."""

    def __init__(self, path: Path, precision: str, threads: int | None):
        from bgevl.runtime.openvino import compile_for_cpu

        self.compiled = compile_for_cpu(path, precision, threads)
        self.request = self.compiled.create_infer_request()  # execute() runs one call at a time

    def run(self, names, feed):
        results = self.request.infer({k: np.ascontiguousarray(v) for k, v in feed.items()})
        return [np.array(results[self.compiled.output(n)], dtype=np.float32) for n in names]


class TritonPythonModel:
    def initialize(self, args):
        self.config = model_config(args)
        self.name = self.config["name"]
        version_dir = Path(args["model_repository"]) / args["model_version"]
        threads = int(parameter(self.config, "intra_op_threads", "0")) or None
        path = version_dir / parameter(self.config, "onnx_file", "model.onnx")
        if parameter(self.config, "engine", "onnxruntime") == "openvino":
            self.session = OpenVinoSession(path, parameter(self.config, "openvino_precision", "bf16"), threads)
        else:
            self.session = create_session(path, None, threads)
        self.inputs = [i["name"] for i in self.config["input"]]
        self.outputs = [o["name"] for o in self.config["output"]]
        self.batched = int(self.config.get("max_batch_size", 0)) > 0
        # Requests arrive padded to the model's text limit (fixed shapes let Triton merge them); with
        # right padding and a causal, mask-pooled graph (CLIP text) the columns after the longest
        # text in the merged batch change nothing, so they are cut before running.
        self.trim_by = parameter(self.config, "trim_right_padding")
        # the graph's declaration (repositories written before it was recorded: no check beyond ONNX Runtime's own)
        graph = parameter(self.config, "graph")
        self.graph = GraphSpec.from_json(json.loads(graph)) if graph else None

    def _requested(self, request) -> list[str]:
        names = list(request.requested_output_names())
        return names or self.outputs

    def _inputs(self, request) -> dict[str, np.ndarray]:
        """The request's feed, checked against the graph's declaration (ids within the vocabulary, the
        sequence within its served range, dtypes): the same check every runtime backend runs, so that no
        engine (OpenVINO reads past its tables) answers a wrong embedding or burns CPU on an overlong input."""
        feed = {name: pb.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}
        if self.graph is not None:
            self.graph.check_feed(feed)
        return feed

    def execute(self, requests):
        """Requests whose inputs have the same shapes past the batch axis run as one ONNX Runtime call;
        when that call fails, each of its requests runs alone, so a bad request fails by itself."""
        if not self.batched:
            return [answer(self.name, self._run_alone, r) for r in requests]
        responses = [None] * len(requests)
        feeds = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            try:
                feeds[i] = self._inputs(request)
            except InputError as exc:  # this request alone is refused; the others run
                responses[i] = error_response(f"{self.name}: {exc}")
                continue
            groups.setdefault(tuple((k, v.shape[1:], v.dtype.str) for k, v in feeds[i].items()), []).append(i)
        for members in groups.values():
            try:
                for i, response in zip(members, self._run_merged([requests[i] for i in members], [feeds[i] for i in members])):
                    responses[i] = response
            except Exception:  # noqa: BLE001 - find the request that failed it
                for i in members:
                    responses[i] = answer(self.name, self._run_alone, requests[i])
        return responses

    def _run_merged(self, requests, feeds):
        wanted = sorted({n for r in requests for n in self._requested(r)})
        sizes = [len(f[self.inputs[0]]) for f in feeds]
        merged = {k: np.concatenate([f[k] for f in feeds]) for k in self.inputs}
        if self.trim_by:
            length = max(int(merged[self.trim_by].sum(axis=1).max()), 1)
            merged = {k: v[:, :length] if v.ndim == 2 and v.shape == merged[self.trim_by].shape else v
                      for k, v in merged.items()}
        results = self.session.run(wanted, merged)
        bounds = np.cumsum([0] + sizes)
        return [pb.InferenceResponse(output_tensors=[
                    pb.Tensor(n, np.ascontiguousarray(results[wanted.index(n)][bounds[i]:bounds[i + 1]]))
                    for n in self._requested(request)])
                for i, request in enumerate(requests)]

    def _run_alone(self, request):
        names = self._requested(request)
        from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

        try:
            results = self.session.run(names, self._inputs(request))
        except InvalidArgument as exc:  # ONNX Runtime rejects this request's values (e.g. token ids out of range)
            raise InputError(f"{self.name}: {str(exc).strip().splitlines()[0]}") from None
        return pb.InferenceResponse(output_tensors=[pb.Tensor(n, r) for n, r in zip(names, results)])
