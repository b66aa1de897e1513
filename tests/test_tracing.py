"""OpenTelemetry traces of the API (``--otlp-endpoint``), received by an in-process OTLP/HTTP collector: one server
span per request, joined to the caller's ``traceparent``, with its child spans; none at all when off. Through
Triton: ``tests/test_api.py::test_bgevl_serve_starts_the_api_in_front_of_its_triton``."""

import pytest

pytest.importorskip("opentelemetry.sdk", reason="needs the api extra: pip install '.[api]'")

from otlp_collector import collector  # noqa: E402
from test_api import TEXTS, _items, assert_error, backend_of, post, serving  # noqa: E402

from bgevl.api.tracing import (  # noqa: E402
    SPAN_DECODE, SPAN_DECODE_BUDGET, SPAN_MODEL_CALL, SPAN_QUEUE_WAIT, SPAN_READ_BODY, traces_url,
)
from bgevl.runtime import Embedder  # noqa: E402

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.fixture(scope="module")
def clip(export_dir):
    with Embedder.load(export_dir("fp32"), provider="cpu") as embedder:
        yield embedder


def check_request_trace(spans, route: str, expected_children: set[str]):
    """The spans of one traced request: its server span, a child of the caller's span, and children under it."""
    [server] = [s for s in spans if s.name == f"POST {route}"]
    assert server.trace_id == TRACE_ID and server.parent_id == "00f067aa0ba902b7" and server.kind == 2  # SERVER
    assert server.attributes["http.response.status_code"] == 200 and server.service == "bgevl-api"
    children = [s for s in spans if s.parent_id == server.span_id]
    assert {s.name for s in children} == expected_children, [s.name for s in children]
    assert all(s.trace_id == TRACE_ID for s in spans)
    return server, children


def test_a_traced_request_has_its_spans_and_an_untraced_server_sends_none(clip):
    with collector() as otlp:
        with serving(backend_of(clip), otlp_endpoint=otlp.url) as server:
            status, _, _ = post(f"{server.url}/v1/embeddings", {"input": _items()}, {"traceparent": TRACEPARENT})
            assert status == 200
        # the server's shutdown sends what its batch processor holds
        spans = otlp.wait_for(1)
        _, children = check_request_trace(spans, "/v1/embeddings",
                                          {SPAN_READ_BODY, SPAN_QUEUE_WAIT, SPAN_DECODE, SPAN_DECODE_BUDGET, SPAN_MODEL_CALL})
        calls = [s for s in children if s.name == SPAN_MODEL_CALL]
        assert sorted((s.attributes["bgevl.kind"], s.attributes["bgevl.items"]) for s in calls) == [
            ("composed", 1), ("image", 2), ("text", 2)]
        [decode] = [s for s in children if s.name == SPAN_DECODE]
        assert decode.attributes["bgevl.images"] == 3

    with collector() as otlp:
        with serving(backend_of(clip)) as server:  # off by default
            assert post(f"{server.url}/v1/embeddings", {"input": TEXTS}, {"traceparent": TRACEPARENT})[0] == 200
        assert otlp.wait_for(1, timeout=1.0) == []


def test_a_failed_request_is_traced_with_its_status_and_the_model_calls_error(clip):
    with collector() as otlp:
        with serving(backend_of(clip), otlp_endpoint=otlp.url + "/v1/traces") as server:
            long_text = " ".join(["word"] * 500)
            assert_error(post(f"{server.url}/v2/embed", {"texts": [long_text]}, {"traceparent": TRACEPARENT}), 400,
                         "texts[0].text", "over the model's limit of 77")
        spans = otlp.wait_for(1)
        [server_span] = [s for s in spans if s.name == "POST /v2/embed"]
        assert server_span.attributes["http.response.status_code"] == 400 and server_span.trace_id == TRACE_ID
        [call] = [s for s in spans if s.name == SPAN_MODEL_CALL]
        assert call.status == 2  # ERROR: the InputError was raised inside it


def test_traces_url():
    assert traces_url("http://collector:4318") == "http://collector:4318/v1/traces"
    assert traces_url("http://collector:4318/") == "http://collector:4318/v1/traces"
    assert traces_url("http://c:4318/v1/traces") == "http://c:4318/v1/traces"
