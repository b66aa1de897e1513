"""The entry model of every repository: the family's serving inputs (BYTES) -> EMBEDDING.

It orchestrates the other models with BLS (business logic scripting) rather than being a
``platform: "ensemble"``: Triton 2.51's ensemble scheduler runs every step and rejects a step
whose input tensor was not produced ("expected 1 inputs but got 0"), so one ensemble cannot take
text *or* image *or* both. Here each request runs the preprocess model, then the model family's
recipe (``Family.steps``, the same one ``bgevl.runtime`` runs), whose graph calls become BLS
requests to the encoder models; the calls of one recipe step run concurrently. The requests of
one ``execute`` are processed concurrently (``async_exec``), so the encoders' dynamic batchers
see them together and merge them. A request of more than ``chunk_items`` items is preprocessed and
embedded in parts, one after the other, so that it holds one preprocess instance at a time for one
part's time: a concurrent small request finds an instance free (the repository gives the entry model
as many instances as the preprocess model). A request its client cancels (a gRPC deadline or cancel, a
closed connection, bgevl-api's timeout) stops before its next part.
"""

from __future__ import annotations

import asyncio
import json
import re

import numpy as np
import triton_python_backend_utils as pb

from bgevl.core.registry import get_family
from bgevl.core.family import run_steps_async
from bgevl.core.preprocessing import one_value_per_request
from bgevl.core.specs import SERVING_EMBEDDING, SERVING_IMAGE, SERVING_TEXT, SERVING_TRUNCATE, GraphSpec
from bgevl.serving.configs import ENTRY_GRAPH_MODELS, ENTRY_PREPROCESS, ENTRY_PREPROCESS_TEXT
from bgevl.serving.models.backend_utils import (
    ModelError, answer_async, call, error_response, model_config, optional_input, parameter,
)


class TritonPythonModel:
    def initialize(self, args):
        config = model_config(args)
        self.name = config["name"]
        self.family = get_family(parameter(config, "family"))
        self.preprocess = parameter(config, ENTRY_PREPROCESS)
        # text-only requests go to a preprocess instance of their own (a repository written before it has none)
        self.preprocess_text = parameter(config, ENTRY_PREPROCESS_TEXT, "") or self.preprocess
        self.graph_models = json.loads(parameter(config, ENTRY_GRAPH_MODELS))
        self.graphs = {name: GraphSpec.from_json(g) for name, g in json.loads(parameter(config, "graphs")).items()}
        self.chunk = int(parameter(config, "chunk_items", "0")) or None

    async def execute(self, requests):
        return await asyncio.gather(*(answer_async(self.name, self._one, r) for r in requests))

    async def _run(self, step_call):
        return await call(self.graph_models[step_call.graph], dict(step_call.feed), list(step_call.outputs))

    async def _one(self, request):
        inputs = {}
        for name in self.family.serving_inputs:
            values = optional_input(request, name)
            if values is not None:
                inputs[name] = values
        if SERVING_IMAGE not in inputs and SERVING_TEXT not in inputs:
            return error_response(f"send {SERVING_TEXT}, {SERVING_IMAGE} or both (BYTES tensors of shape [batch, 1])")
        truncate = optional_input(request, SERVING_TRUNCATE)
        if truncate is not None:
            truncate = one_value_per_request(truncate, SERVING_TRUNCATE)[0]
        items = max(len(inputs[name]) for name in (SERVING_IMAGE, SERVING_TEXT) if name in inputs)
        step = self.chunk or items
        parts = []
        for start in range(0, items, step):  # one part after the other: see the module docstring
            if start and request.is_cancelled():  # its client went away or timed out: no further part
                raise ModelError(f"cancelled by the client after {start} of {items} items", pb.TritonError.CANCELLED)
            part = {name: values[start:start + step] if name in (SERVING_IMAGE, SERVING_TEXT) else values
                    for name, values in inputs.items()}
            try:
                prepared = self.family.serving_preprocess_inputs(part)
                if truncate is not None and SERVING_TEXT in prepared:  # shaped as the texts the preprocess model takes
                    prepared[SERVING_TRUNCATE] = np.full(prepared[SERVING_TEXT].shape, truncate, dtype=object)
                preprocess = self.preprocess if SERVING_IMAGE in part else self.preprocess_text
                feeds = await call(preprocess, prepared, self.family.preprocess_outputs(set(part)), input_errors=True)
            except ModelError as exc:
                raise ModelError(_renumbered(str(exc), start), exc.code) from None
            parts.append(await run_steps_async(self.family.steps(feeds, self.graphs), self._run))
        out = np.concatenate([np.asarray(p, np.float32) for p in parts])
        return pb.InferenceResponse(output_tensors=[pb.Tensor(SERVING_EMBEDDING, np.ascontiguousarray(out, np.float32))])


def _renumbered(message: str, offset: int) -> str:
    """A preprocess message about item ``k`` of a part (``images[k]``, ``texts[k]``...) names it by its index
    in the whole request."""
    if not offset:
        return message
    return re.sub(r"(\w+)\[(\d+)\]", lambda m: f"{m.group(1)}[{int(m.group(2)) + offset}]", message)
