"""Helpers shared by the python-backend models (importable only inside Triton's python-backend stub)."""

from __future__ import annotations

import asyncio
import json
import time
import traceback

import numpy as np

import triton_python_backend_utils as pb

from bgevl.core.errors import InputError


#: In the message of every unexpected failure these models answer (``internal_error``).
INTERNAL_MARK = "internal error ("
#: Triton's own messages for a model that could not run a request (a dead stub, an unloaded model).
SERVER_FAILURES = ("Stub process", "is not healthy", "Failed to process the request", "unknown model", "is not ready")


def model_config(args) -> dict:
    return json.loads(args["model_config"])


def parameter(config: dict, key: str, default: str | None = None) -> str | None:
    value = config.get("parameters", {}).get(key)
    return value["string_value"] if value else default


def error_response(message: str, code=None):
    """An error answer; ``code`` defaults to INVALID_ARG (HTTP 400, gRPC INVALID_ARGUMENT): the errors
    these models raise on purpose are about the request."""
    return pb.InferenceResponse(output_tensors=[], error=pb.TritonError(message, pb.TritonError.INVALID_ARG if code is None else code))


def internal_error(model: str, exc: BaseException):
    """An unexpected failure: the traceback goes to the server log, the client gets one line without
    file paths (HTTP 500)."""
    pb.Logger.log_error(f"{model}: {''.join(traceback.format_exception(exc))}")
    return error_response(f"{model}: {INTERNAL_MARK}{type(exc).__name__}); the server log has the details",
                          pb.TritonError.INTERNAL)


def answer(model: str, handle, request):
    """``handle(request)`` with the failure isolated to this request:
    the errors these models raise about the request (``InputError``) answer 400 with their message,
    anything else 500 without a traceback."""
    try:
        return handle(request)
    except InputError as exc:
        return error_response(str(exc))
    except Exception as exc:  # noqa: BLE001 - one request's failure is that request's alone
        return internal_error(model, exc)


async def answer_async(model: str, handle, request):
    """:func:`answer` for coroutine handlers (the BLS entry models)."""
    try:
        return await handle(request)
    except ModelError as exc:
        return error_response(str(exc), exc.code)
    except InputError as exc:
        return error_response(str(exc))
    except Exception as exc:  # noqa: BLE001
        return internal_error(model, exc)


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
            raise InputError(f"{name}[{i}] is not valid UTF-8 ({exc}); send UTF-8 encoded text") from None
    return out


def output_array(response, name: str) -> np.ndarray:
    tensor = pb.get_output_tensor_by_name(response, name)
    if tensor is None:
        raise RuntimeError(f"missing output {name!r}")
    return tensor.as_numpy() if tensor.is_cpu() else np.from_dlpack(tensor.to_dlpack())


#: Triton's answer for a request its scheduler gave to an instance whose stub process died.
DEAD_STUB = ("Stub process", "is not healthy")
#: How long a BLS call keeps retrying a request that met a dead stub, and the first pause (doubled to 1 s).
DEAD_STUB_RETRY_S, DEAD_STUB_PAUSE_S = 30.0, 0.05


def met_dead_stub(message: str) -> bool:
    return all(part in message for part in DEAD_STUB)


async def call(model: str, inputs: dict[str, np.ndarray], outputs: list[str], input_errors: bool = False) -> dict[str, np.ndarray]:
    """One BLS request; a model error is re-raised with that model's message, as an input error (400)
    when ``input_errors`` (the called model only checks and converts the client's input) and the
    message is not an internal or server failure, else as an internal error (500).

    A request that met a dead stub is sent again, for up to :data:`DEAD_STUB_RETRY_S`: Triton 2.51 keeps
    giving requests to an instance whose stub died (measured: the preprocess model with one of its two
    stubs killed answered "Stub process ... is not healthy" to a share of the requests, for as long as it
    was watched), although the model's other instances serve; the model's requests are pure (an
    embedding), so a second try is safe. The retry reaches a live instance, or the model that
    ``bgevl-serve`` reloads meanwhile (it swaps a model with a live instance left without a gap); a model
    that ``bgevl-serve`` unloaded answers "not ready" and is not retried."""
    request = pb.InferenceRequest(model_name=model, requested_output_names=outputs,
                                  inputs=[pb.Tensor(k, v) for k, v in inputs.items()])
    deadline, pause = time.monotonic() + DEAD_STUB_RETRY_S, DEAD_STUB_PAUSE_S
    response = await request.async_exec()
    while response.has_error() and met_dead_stub(response.error().message()) and time.monotonic() < deadline:
        await asyncio.sleep(pause)
        pause = min(2 * pause, 1.0)
        response = await request.async_exec()
    if response.has_error():
        # Triton 2.51's BLS responses carry every error as INTERNAL (measured: the code the called model
        # set is lost), so the caller says which steps only judge the client's input (preprocessing)
        message = response.error().message()
        is_input = input_errors and INTERNAL_MARK not in message and not any(m in message for m in SERVER_FAILURES)
        raise ModelError(message, pb.TritonError.INVALID_ARG if is_input else pb.TritonError.INTERNAL)
    return {name: output_array(response, name) for name in outputs}


class ModelError(Exception):
    """An error answered by a model this one called (its message and code go back to the client)."""

    def __init__(self, message: str, code=None):
        super().__init__(message)
        self.code = code
