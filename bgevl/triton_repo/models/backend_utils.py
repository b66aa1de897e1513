"""Helpers shared by the python-backend models (importable only inside Triton's python-backend stub)."""

from __future__ import annotations

import json

import numpy as np

import triton_python_backend_utils as pb


def model_config(args) -> dict:
    return json.loads(args["model_config"])


def parameter(config: dict, key: str, default: str | None = None) -> str | None:
    value = config.get("parameters", {}).get(key)
    return value["string_value"] if value else default


def error_response(message: str):
    return pb.InferenceResponse(output_tensors=[], error=pb.TritonError(message))


def optional_input(request, name: str) -> np.ndarray | None:
    tensor = pb.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def decode_bytes(values: np.ndarray, name: str) -> list[bytes]:
    """A BYTES tensor [batch, 1] (or [n]) -> one bytes object per item."""
    flat = values.reshape(-1) if values.ndim <= 1 else values[:, 0]
    return [bytes(v) if not isinstance(v, bytes) else v for v in flat]


def decode_text(values: np.ndarray, name: str = "TEXT") -> list[str]:
    out = []
    for i, raw in enumerate(decode_bytes(values, name)):
        try:
            out.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ValueError(f"{name}[{i}] is not valid UTF-8 ({exc}); send UTF-8 encoded text") from None
    return out


def output_array(response, name: str) -> np.ndarray:
    tensor = pb.get_output_tensor_by_name(response, name)
    if tensor is None:
        raise RuntimeError(f"missing output {name!r}")
    return tensor.as_numpy() if tensor.is_cpu() else np.from_dlpack(tensor.to_dlpack())


async def call(model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
    """One BLS request; a model error is re-raised with that model's message."""
    request = pb.InferenceRequest(model_name=model, requested_output_names=outputs,
                                  inputs=[pb.Tensor(k, v) for k, v in inputs.items()])
    response = await request.async_exec()
    if response.has_error():
        raise ModelError(response.error().message())
    return {name: output_array(response, name) for name in outputs}


class ModelError(Exception):
    """An error answered by a model this one called (its message goes back to the client)."""
