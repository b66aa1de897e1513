"""The embeddings API (``bgevl.api``) over real HTTP: uvicorn on 127.0.0.1 and the real ``openai`` client.

Every embedding is compared with ``Embedder.encode`` on the same inputs (cosine >= 0.9999) for the
tiny CLIP, MLLM and Visualized-BGE exports; each error path is a real request whose status and
OpenAI error object are checked; a bad image among concurrent valid requests fails alone.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import logging
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

openai = pytest.importorskip("openai", reason="needs the test extra: pip install '.[test]'")
pytest.importorskip("fastapi", reason="needs the api extra: pip install '.[api]'")

import samples  # noqa: E402
from samples import IMAGES, TEXTS, jobs_with_bad_ones, png, png_of  # noqa: E402

from bgevl.api.app import ApiOptions  # noqa: E402
from bgevl.api.backends import EmbedderBackend, TritonBackend  # noqa: E402
from bgevl.api.cli import ApiServer  # noqa: E402
from bgevl.api.images import FetchPolicy  # noqa: E402
from bgevl.runtime import Embedder  # noqa: E402
from bgevl.serving.server import free_port  # noqa: E402

INSTRUCTION = "Retrieve the target image that best meets the combined criteria"


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def assert_matches(served, direct: np.ndarray) -> None:
    samples.assert_matches(np.asarray(served, np.float32), direct)


def vectors(response) -> np.ndarray:
    assert [d.index for d in response.data] == list(range(len(response.data)))
    return np.array([d.embedding for d in response.data], np.float32)


def post(url: str, body, headers: dict | None = None) -> tuple[int, dict, dict]:
    """A raw POST: (status, headers, JSON body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, json.loads(exc.read())


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def assert_error(result, status: int, param, *fragments: str, code=None) -> dict:
    got_status, _, body = result
    assert got_status == status, (got_status, body)
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    for fragment in fragments:
        assert fragment in error["message"], error
    assert "Traceback" not in error["message"] and "\n" not in error["message"]
    return error


@contextmanager
def serving(backend, **options):
    server = ApiServer(backend, ApiOptions(**options)).start()
    try:
        yield server
    finally:
        server.stop()
        assert not server.thread.is_alive(), "the API server thread did not stop"


@pytest.fixture(scope="module")
def embedders(export_dir):
    out = {}

    def get(model: str) -> Embedder:
        if model not in out:
            out[model] = Embedder.load(export_dir("fp32", model=model), provider="cpu")
        return out[model]

    return get


def backend_of(embedder: Embedder, name: str = "bgevl", cls=EmbedderBackend, **kw):
    return cls(embedder.manifest.directory, name=name, embedder=embedder, **kw)


@pytest.fixture(scope="module")
def clip(embedders):
    embedder = embedders("tiny")
    with serving(backend_of(embedder)) as server:
        yield server, embedder


def client(server, key: str = "unused") -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)


# --- embeddings equal the runtime's ------------------------------------------------------

def _items():
    return [{"image": data_url(IMAGES[0])}, {"text": TEXTS[1]}, {"text": TEXTS[2], "image": base64.b64encode(IMAGES[2]).decode()},
            data_url(IMAGES[1]), TEXTS[0]]


def _direct(embedder, role=None, instruction=None) -> np.ndarray:
    """The runtime's embeddings of _items(), one call per kind as a user of Embedder would make them."""
    kw = {"role": role, "instruction": instruction}
    return np.concatenate([embedder.encode(images=[IMAGES[0]], **kw), embedder.encode(text=[TEXTS[1]], **kw),
                           embedder.encode(images=[IMAGES[2]], text=[TEXTS[2]], **kw),
                           embedder.encode(images=[IMAGES[1]], **kw), embedder.encode(text=[TEXTS[0]], **kw)])


@pytest.mark.parametrize("model", ["tiny", "tiny-mllm", "tiny-visualized", "tiny-screenshot"])
def test_openai_client_gets_the_runtimes_embeddings(embedders, model):
    embedder = embedders(model)
    with serving(backend_of(embedder, name=model)) as server:
        api = client(server)
        texts = embedder.encode(text=TEXTS)
        default = api.embeddings.create(model=model, input=TEXTS)  # the client asks for base64 and decodes it
        assert_matches(vectors(default), texts)
        assert default.model == model and default.usage.prompt_tokens > len(TEXTS)
        assert default.usage.total_tokens == default.usage.prompt_tokens
        assert_matches(vectors(api.embeddings.create(model=model, input=TEXTS, encoding_format="float")), texts)
        one = api.embeddings.create(model=model, input=TEXTS[0], encoding_format="float")
        assert_matches(vectors(one), texts[:1])
        raw = api.embeddings.create(model=model, input=TEXTS[:1], encoding_format="base64")
        decoded = np.frombuffer(base64.b64decode(raw.data[0].embedding), "<f4")
        assert_matches(decoded[None], texts[:1])

        mixed = api.embeddings.create(model=model, input=[], encoding_format="float", extra_body={"input": _items()})
        assert_matches(vectors(mixed), _direct(embedder))
        queries = api.embeddings.create(model=model, input=[], extra_body={"input": _items(), "input_type": "query"})
        assert_matches(vectors(queries), _direct(embedder, role="query"))
        documents = api.embeddings.create(model=model, input=[], extra_body={"input": _items(), "input_type": "passage"})
        assert_matches(vectors(documents), _direct(embedder, role="candidate"))

        message = {"model": model, "encoding_format": "float", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(IMAGES[2])}}, {"type": "text", "text": TEXTS[2]}]}]}
        chat = api.post("/embeddings", cast_to=openai.types.CreateEmbeddingResponse, body=message)
        assert_matches(vectors(chat), embedder.encode(images=[IMAGES[2]], text=[TEXTS[2]]))

        _check_truncate(api, server, embedder, model)
        queries = _check_instruction(api, server, embedder, model)
        if queries is not None:
            differs = (queries * vectors(documents)).sum(axis=1)
            assert differs.max() < 0.9999, "query and candidate prompts gave the same embeddings"


def _check_instruction(api, server, embedder, model: str) -> np.ndarray | None:
    """Queries with an instruction: the runtime's embeddings where the family takes one (returned), else a
    400 naming ``instruction``."""
    with_instruction = {"input": _items(), "input_type": "query", "instruction": INSTRUCTION}
    if embedder.default_instruction is None:  # the families without task instructions
        assert_error(post(f"{server.url}/v1/embeddings", with_instruction), 400, "instruction", "instruction")
        return None
    out = vectors(api.embeddings.create(model=model, input=[], extra_body=with_instruction))
    assert_matches(out, _direct(embedder, role="query", instruction=INSTRUCTION))
    return out


def test_mllm_refuses_an_instruction_on_documents(embedders):
    embedder = embedders("tiny-mllm")
    with serving(backend_of(embedder)) as server:
        result = post(f"{server.url}/v1/embeddings", {"input": TEXTS, "input_type": "document", "instruction": INSTRUCTION})
        assert_error(result, 400, "instruction", "instruction applies to queries only")


# --- every error path over HTTP ------------------------------------------------------------

BAD_REQUESTS = [
    ("undecodable image", {"input": [TEXTS[0], {"image": base64.b64encode(b"not an image at all").decode()}]},
     "input[1].image", "input[1].image: not a readable image"),
    ("bad base64", {"input": [{"image": "data:image/png;base64,@@@"}]}, "input[0].image", "not valid base64"),
    ("http url refused", {"input": [{"text": "x", "image": "http://169.254.169.254/latest/meta-data"}]},
     "input[0].image", "SSRF"),
    ("file url", {"input": [{"image": "file:///etc/passwd"}]}, "input[0].image", "local files are not read"),
    ("local path", {"input": [TEXTS[0], TEXTS[1], {"image": "/etc/passwd"}]}, "input[2].image", "local files are not read"),
    ("token ids", {"input": [[1212, 318, 257]]}, "input", "token-id arrays", "check_embedding_ctx_length=False"),
    ("flat token ids", {"input": [1212, 318]}, "input", "token-id arrays"),
    ("dimensions", {"input": TEXTS, "dimensions": 8}, "dimensions", "not trained for truncated"),
    ("empty text", {"input": [TEXTS[0], "   "]}, "input[1].text", "empty text"),
    ("empty item", {"input": [{}]}, "input[0]", "needs 'text', 'image' or both"),
    ("unknown field", {"input": TEXTS, "modality": "text"}, "modality", "unknown field 'modality'"),
    ("unknown item field", {"input": [{"txt": "a"}]}, "input[0]", "unknown field 'txt'"),
    ("bad input_type", {"input": TEXTS, "input_type": "judge"}, "input_type", "'query', 'document' or 'passage'"),
    ("bad encoding", {"input": TEXTS, "encoding_format": "int8"}, "encoding_format", "'float' or 'base64'"),
    ("both forms", {"input": TEXTS, "messages": [{"role": "user", "content": "x"}]}, "input", "either 'input'"),
    ("neither form", {"model": "bgevl"}, "input", "either 'input'"),
    ("two images in messages", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(IMAGES[0])}},
        {"type": "image_url", "image_url": {"url": data_url(IMAGES[1])}}]}]}, "messages", "at most one image"),
]


@pytest.mark.parametrize("body,param,fragments", [pytest.param(c[1], c[2], c[3:], id=c[0]) for c in BAD_REQUESTS])
def test_bad_requests_are_400_naming_the_item(clip, body, param, fragments):
    server, embedder = clip
    assert_error(post(f"{server.url}/v1/embeddings", body), 400, param, *fragments)
    ok = post(f"{server.url}/v1/embeddings", {"input": TEXTS[:1], "encoding_format": "float"})
    assert ok[0] == 200 and ok[2]["data"][0]["index"] == 0


def test_invalid_json_is_400(clip):
    server, _ = clip
    assert_error(post(f"{server.url}/v1/embeddings", b"{not json"), 400, None, "not valid JSON")


def test_images_over_the_input_limits_are_400(clip):
    server, _ = clip
    buf = io.BytesIO()
    Image.new("L", (40000, 2)).save(buf, "PNG", optimize=True)
    assert len(buf.getvalue()) < 1000
    result = post(f"{server.url}/v1/embeddings", {"input": [TEXTS[0], {"image": data_url(buf.getvalue())}]})
    assert_error(result, 400, "input[1].image", "input[1].image: 40000x2 has an aspect ratio of 20000:1")


def test_unknown_model_is_404_and_models_lists_the_served_one(clip):
    server, _ = clip
    assert_error(post(f"{server.url}/v1/embeddings", {"model": "text-embedding-3-small", "input": TEXTS}), 404,
                 "model", "'text-embedding-3-small' is not served here", "'bgevl'", code="model_not_found")
    with pytest.raises(openai.NotFoundError):
        client(server).embeddings.create(model="other", input=TEXTS)
    assert [m.id for m in client(server).models.list()] == ["bgevl"]
    status, body = get(f"{server.url}/v1/nothing")
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"


def test_api_key_is_required_where_set_and_never_echoed(embedders):
    embedder = embedders("tiny")
    key = "s3cret-key-value"
    with serving(backend_of(embedder), api_key=key) as server:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
            error = assert_error(post(f"{server.url}/v1/embeddings", {"input": TEXTS}, headers), 401, None,
                                 "Authorization: Bearer", code="invalid_api_key")
            assert key not in error["message"]
        with pytest.raises(openai.AuthenticationError):
            client(server, "wrong").embeddings.create(model="bgevl", input=TEXTS)
        with pytest.raises(openai.AuthenticationError):
            client(server, "wrong").models.list()
        assert_matches(vectors(client(server, key).embeddings.create(model="bgevl", input=TEXTS)), embedder.encode(text=TEXTS))
        assert get(f"{server.url}/health/ready")[0] == 200  # probes need no key


def test_a_body_over_the_limit_is_413(embedders):
    embedder = embedders("tiny")
    with serving(backend_of(embedder), max_body_bytes=4096) as server:
        result = post(f"{server.url}/v1/embeddings", {"input": [{"image": data_url(png(9, (64, 64)))}]})
        assert_error(result, 413, None, "over the limit of 4096 bytes", code="body_too_large")
        assert post(f"{server.url}/v1/embeddings", {"input": TEXTS})[0] == 200


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_a_body_that_is_not_json_is_415(embedders, content_type):
    """What a web page may POST to any origin without a CORS preflight is refused, before the body is read."""
    embedder = embedders("tiny")
    with serving(backend_of(embedder)) as server:
        request = urllib.request.Request(f"{server.url}/v1/embeddings", data=json.dumps({"input": TEXTS}).encode(),
                                         method="POST", headers={"Content-Type": content_type})
        try:
            urllib.request.urlopen(request, timeout=60)
            raise AssertionError("not refused")
        except urllib.error.HTTPError as exc:
            result = exc.code, {k.lower(): v for k, v in exc.headers.items()}, json.loads(exc.read())
        assert_error(result, 415, None, "send the body as JSON", code="unsupported_media_type")
        assert post(f"{server.url}/v1/embeddings", {"input": TEXTS})[0] == 200


class GatedBackend(EmbedderBackend):
    """Holds each encode call until ``gate`` opens (bounded), so that requests stay in flight."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.gate, self.entered = threading.Event(), threading.Semaphore(0)

    def _encode(self, *args):
        self.entered.release()
        assert self.gate.wait(60), "the test never opened the gate"
        return super()._encode(*args)


def test_a_full_queue_is_429_with_retry_after_and_the_admitted_requests_finish(embedders):
    embedder = embedders("tiny")
    backend = backend_of(embedder, cls=GatedBackend)
    with serving(backend, max_in_flight=1, queue=1) as server, ThreadPoolExecutor(2) as pool:
        url = f"{server.url}/v1/embeddings"
        first = pool.submit(post, url, {"input": TEXTS[:1], "encoding_format": "float"})
        assert backend.entered.acquire(timeout=30)  # the first one is computing
        second = pool.submit(post, url, {"input": TEXTS[1:2], "encoding_format": "float"})
        deadline = time.monotonic() + 30
        while "bgevl_api_queued 1.0" not in get(f"{server.url}/metrics")[1]:  # the second one is queued
            assert time.monotonic() < deadline, "the second request was never queued"
            time.sleep(0.02)
        status, headers, body = post(url, {"input": TEXTS[2:3]})
        assert_error((status, headers, body), 429, None, "1 requests in flight, 1 queued", code="queue_full")
        assert body["error"]["type"] == "rate_limit_error" and headers["retry-after"] == "1"
        backend.gate.set()
        for job, i in ((first, 0), (second, 1)):
            status, _, body = job.result(60)
            assert status == 200
            assert_matches([body["data"][0]["embedding"]], embedder.encode(text=TEXTS[i:i + 1]))
        assert post(url, {"input": TEXTS[2:3]})[0] == 200


def test_a_request_over_the_timeout_is_504_and_keeps_its_slot_until_its_work_ends(embedders):
    embedder = embedders("tiny")
    backend = backend_of(embedder, cls=GatedBackend)
    with serving(backend, max_in_flight=1, queue=0, timeout_s=0.5) as server:
        url = f"{server.url}/v1/embeddings"
        assert_error(post(url, {"input": TEXTS[:1]}), 504, None, "longer than the server's timeout of 0.5 s",
                     code="timeout")
        assert_error(post(url, {"input": TEXTS[:1]}), 429, None, code="queue_full")  # still computing
        backend.gate.set()
        deadline = time.monotonic() + 30
        while "bgevl_api_in_flight 0.0" not in get(f"{server.url}/metrics")[1]:
            assert time.monotonic() < deadline, "the timed-out work never released its slot"
            time.sleep(0.02)
        assert post(url, {"input": TEXTS[:1]})[0] == 200


@pytest.fixture
def slow_embedder(export_dir):
    """A tiny CLIP embedder that runs one item per batch, each run 0.1 s longer and recorded: a long request whose
    batches can be counted."""
    embedder = Embedder.load(export_dir("fp32"), provider="cpu")
    embedder.max_batch = 1
    runs, run = [], embedder.run

    def slow_run(feeds):
        runs.append(time.monotonic())
        time.sleep(0.1)
        return run(feeds)

    embedder.run = slow_run
    yield embedder, runs
    embedder.close()


def _metric_line(server, prefix: str) -> str:
    return next((line for line in get(f"{server.url}/metrics")[1].splitlines() if line.startswith(prefix)), "")


def _wait_idle(server, runs, timeout: float = 30.0) -> int:
    """Waits until no request is in flight and no batch has run for 0.5 s; the batches run by then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _metric_line(server, "bgevl_api_in_flight ") == "bgevl_api_in_flight 0.0" and \
                (not runs or time.monotonic() - runs[-1] > 0.5):
            return len(runs)
        time.sleep(0.05)
    raise AssertionError("the request's work never stopped")


def test_a_timed_out_request_stops_its_work_before_the_next_batch(slow_embedder):
    embedder, runs = slow_embedder
    with serving(backend_of(embedder), timeout_s=1.0) as server:
        body = {"input": [{"image": data_url(IMAGES[i % 3])} for i in range(40)]}
        assert_error(post(f"{server.url}/v1/embeddings", body), 504, None, "timeout of 1 s", code="timeout")
        done = _wait_idle(server, runs)
        assert done <= 14, f"{done} of 40 batches ran after a 504 at about 10"  # 1 s of 0.1 s batches, and one more
        assert _metric_line(server, 'bgevl_api_cancelled_total{reason="timeout"}').endswith(" 1.0")
        assert post(f"{server.url}/v1/embeddings", {"input": TEXTS})[0] == 200  # the slot is free again


@contextmanager
def _request_left_open(server, body: dict):
    """A raw HTTP request whose client closes its connection, unanswered, when the block ends."""
    import socket

    data = json.dumps(body).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
        yield


def _until(condition, what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


def test_a_client_that_goes_away_stops_its_work_and_leaves_the_queue(slow_embedder):
    embedder, runs = slow_embedder
    with serving(backend_of(embedder), max_in_flight=1, queue=4) as server:
        body = {"input": [{"image": data_url(IMAGES[i % 3])} for i in range(40)]}
        with _request_left_open(server, body):
            _until(lambda: len(runs) >= 3, "the first request computes")
            with _request_left_open(server, body):
                _until(lambda: _metric_line(server, "bgevl_api_queued ") == "bgevl_api_queued 1.0",
                       "the second request waits for the slot")
            _until(lambda: _metric_line(server, "bgevl_api_queued ") == "bgevl_api_queued 0.0",
                   "the second request, its client gone, leaves the queue")
            assert len(runs) < 40
        closed_at = len(runs)
        done = _wait_idle(server, runs)
        # the batch running when the client left, and those of the 0.2 s the server takes to notice
        assert done <= closed_at + 5 < 40, f"{done} of 40 batches ran; the client left after {closed_at}"
        assert _metric_line(server, 'bgevl_api_cancelled_total{reason="client_closed"}').endswith(" 1.0")
        assert _metric_line(server, 'bgevl_api_requests_total{code="499",route="/v1/embeddings"}').endswith(" 2.0")
        assert post(f"{server.url}/v1/embeddings", {"input": TEXTS})[0] == 200


class GatedImages(GatedBackend):
    """Holds only the encode calls with images."""

    def _encode(self, images, *args):
        if images is None:
            return EmbedderBackend._encode(self, images, *args)
        return super()._encode(images, *args)


def test_images_wait_for_the_decode_budget_and_texts_never_do(embedders):
    """Admission by work: the first request's two images (6,272 pixels) hold a budget of 6,500, so the next
    request's image (4,096) waits for them while a text request is answered at once."""
    embedder = embedders("tiny")
    backend = backend_of(embedder, cls=GatedImages)
    with serving(backend, max_decode_pixels=6500) as server, ThreadPoolExecutor(2) as pool:
        url = f"{server.url}/v1/embeddings"
        first = pool.submit(post, url, {"input": [data_url(IMAGES[0]), data_url(IMAGES[1])]})
        assert backend.entered.acquire(timeout=30)
        assert _metric_line(server, "bgevl_api_decode_pixels ") == "bgevl_api_decode_pixels 6272.0"
        second = pool.submit(post, url, {"input": [data_url(IMAGES[2])]})
        _until(lambda: _metric_line(server, "bgevl_api_decode_waiting ") == "bgevl_api_decode_waiting 1.0",
               "the second request waits for the budget")
        assert not backend.entered.acquire(timeout=0.3), "the second request's images were decoded over the budget"
        assert post(url, {"input": TEXTS})[0] == 200  # text costs nothing
        backend.gate.set()
        assert first.result(60)[0] == 200 and second.result(60)[0] == 200
        _until(lambda: _metric_line(server, "bgevl_api_decode_pixels ") == "bgevl_api_decode_pixels 0.0",
               "the budget is given back")


class FailingBackend(EmbedderBackend):
    def _encode(self, *args):
        raise RuntimeError("the runner broke\n  File \"/secret/path.py\", line 1")


def test_an_internal_error_is_500_in_one_line_with_the_traceback_in_the_log(embedders, caplog):
    with serving(backend_of(embedders("tiny"), cls=FailingBackend)) as server:
        error = assert_error(post(f"{server.url}/v1/embeddings", {"input": TEXTS}), 500, None,
                             "internal error: RuntimeError: the runner broke", code="internal_error")
        assert "/secret/path.py" not in error["message"]
    assert any(r.exc_info and "Traceback" not in r.getMessage() for r in caplog.records if r.name == "bgevl.api")


def test_a_backend_that_is_not_ready_is_503_and_health_says_so():
    backend = TritonBackend(f"127.0.0.1:{free_port()}", name="bgevl")  # nothing listens there
    with serving(backend) as server:
        assert get(f"{server.url}/health/live")[0] == 200
        status, body = get(f"{server.url}/health/ready")
        assert status == 503 and "does not answer" in json.loads(body)["reason"]
        assert get(f"{server.url}/v1/health/live")[0] == 200 and get(f"{server.url}/v1/health/ready")[0] == 503  # NIM's
        status, headers, body = post(f"{server.url}/v1/embeddings", {"input": TEXTS})
        assert_error((status, headers, body), 503, None, "not ready", code="not_ready")
        assert headers["retry-after"] == "5"


def test_health_models_metrics_and_openapi(clip):
    server, _ = clip
    assert get(f"{server.url}/health/live") == (200, '{"status":"live"}')
    status, body = get(f"{server.url}/health/ready")
    assert status == 200 and json.loads(body) == {"status": "ready", "model": "bgevl"}
    before = get(f"{server.url}/metrics")[1]
    post(f"{server.url}/v1/embeddings", {"input": [TEXTS[0], {"image": data_url(IMAGES[0])}]})
    post(f"{server.url}/v1/embeddings", {"input": [[1, 2]]})
    after = get(f"{server.url}/metrics")[1]

    def sample(text: str, name: str) -> float:
        lines = [line for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{")]
        return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0

    ok, bad = ('bgevl_api_requests_total{code="200",route="/v1/embeddings"}',
               'bgevl_api_requests_total{code="400",route="/v1/embeddings"}')
    assert sample(after, ok) - sample(before, ok) == 1 and sample(after, bad) - sample(before, bad) == 1
    for kind in ("text", "image"):
        name = f'bgevl_api_items_total{{kind="{kind}"}}'
        assert sample(after, name) - sample(before, name) == 1
    assert 'bgevl_api_request_seconds_bucket{le="+Inf",route="/v1/embeddings"}' in after
    assert sample(after, "bgevl_api_in_flight") == 0
    status, body = get(f"{server.url}/openapi.json")
    schema = json.loads(body)
    assert status == 200 and "/v1/embeddings" in schema["paths"] and "input_type" in \
        schema["components"]["schemas"]["EmbeddingRequest"]["properties"]
    assert get(f"{server.url}/docs")[0] == 200


# --- one bad item fails its request alone ---------------------------------------------------

@pytest.mark.parametrize("bad", ["bomb", "undecodable"])
def test_a_bad_image_among_30_concurrent_valid_requests_fails_alone(clip, bad):
    server, embedder = clip
    payload = png_of(Image.new("1", (13000, 13000))) if bad == "bomb" else IMAGES[0][:200]
    want = embedder.encode(images=IMAGES)
    jobs = jobs_with_bad_ones("bad")

    def send(job):
        kind, i = job
        item = {"text": TEXTS[i], "image": data_url(IMAGES[i])} if kind == "valid" and i == 2 else \
            {"image": data_url(payload if kind == "bad" else IMAGES[i])}
        return kind, i, post(f"{server.url}/v1/embeddings", {"input": [TEXTS[0], item], "encoding_format": "float"})

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, jobs))
    for kind, i, (status, headers, body) in results:
        if kind == "valid":
            assert status == 200, body
            direct = embedder.encode(images=IMAGES[2:], text=TEXTS[2:]) if i == 2 else want[i:i + 1]
            assert_matches([body["data"][1]["embedding"]], direct)
        else:
            reason = "169.0 M pixels, over the limit" if bad == "bomb" else "corrupt or truncated"
            assert_error((status, headers, body), 400, "input[1].image", "input[1].image:", reason)


# --- image URLs from allowed hosts ----------------------------------------------------------

@contextmanager
def image_host(routes: dict[str, tuple[int, dict, bytes]]):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            status, headers, body = routes.get(self.path, (404, {}, b""))
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_image_urls_are_fetched_only_from_allowed_hosts_within_limits(embedders):
    embedder = embedders("tiny")
    big = png(5, (400, 400))
    with image_host({"/a.png": (200, {"Content-Type": "image/png"}, IMAGES[1]), "/big.png": (200, {}, big),
                     "/away": (302, {"Location": "http://example.invalid/x.png"}, b""),
                     "/back": (302, {"Location": "/a.png"}, b"")}) as host:
        policy = FetchPolicy(hosts=frozenset({host}), max_bytes=len(big) - 1)
        with serving(backend_of(embedder), fetch=policy) as server:
            url = f"{server.url}/v1/embeddings"
            for path in ("/a.png", "/back"):
                status, _, body = post(url, {"input": [{"image": f"http://{host}{path}"}], "encoding_format": "float"})
                assert status == 200, body
                assert_matches([body["data"][0]["embedding"]], embedder.encode(images=IMAGES[1:2]))
            assert_error(post(url, {"input": [{"image": f"http://{host}/big.png"}]}), 400, "input[0].image",
                         f"over the server's limit of {len(big) - 1}")
            assert_error(post(url, {"input": [{"image": f"http://{host}/away"}]}), 400, "input[0].image",
                         "redirects to 'example.invalid'")
            assert_error(post(url, {"input": [{"image": "http://localhost:1/a.png"}]}), 400, "input[0].image",
                         "not in the server's --allow-image-host list")
            assert_error(post(url, {"input": [{"image": f"http://{host}/missing.png"}]}), 400, "input[0].image", "HTTP 404")


def test_an_allowed_name_that_resolves_to_the_servers_own_network_or_a_bad_port_is_400(embedders):
    """An allowed name resolving to 127.0.0.1 reached another local service; ':99999' was a 500 with a traceback;
    a bare allowed name opened every port of its host."""
    embedder = embedders("tiny")
    with image_host({"/a.png": (200, {"Content-Type": "image/png"}, IMAGES[1])}) as host:
        port = host.rsplit(":", 1)[1]
        policy = FetchPolicy(hosts=frozenset({f"localhost:{port}", "localhost", "example.com"}))
        with serving(backend_of(embedder), fetch=policy) as server:
            url = f"{server.url}/v1/embeddings"
            assert_error(post(url, {"input": [{"image": f"http://localhost:{port}/a.png"}]}), 400, "input[0].image",
                         "host 'localhost' resolves to 127.0.0.1", "name the address itself")
            assert_error(post(url, {"input": [{"image": "http://localhost:99999/a.png"}]}), 400, "input[0].image",
                         "'localhost:99999' is not a valid host and port")
            assert_error(post(url, {"input": [{"image": f"http://example.com:{port}/a.png"}]}), 400, "input[0].image",
                         "not in the server's --allow-image-host list", "default port only")
        named = FetchPolicy(hosts=frozenset({host}))  # the address itself, named by the operator: fetched
        with serving(backend_of(embedder), fetch=named) as server:
            status, _, body = post(f"{server.url}/v1/embeddings", {"input": [{"image": f"http://{host}/a.png"}],
                                                                   "encoding_format": "float"})
            assert status == 200, body


# --- the command ----------------------------------------------------------------------------

def test_bgevl_api_serves_an_export_and_finishes_in_flight_requests_on_sigterm(export_dir, embedders, tmp_path):
    export = export_dir("fp32", model="tiny")
    port = free_port()
    key_file = tmp_path / "key"
    key_file.write_text("k3y-from-a-file\n")
    proc = subprocess.Popen([sys.executable, "-m", "bgevl.api.cli", str(export), "--port", str(port), "--provider", "cpu",
                             "--api-key-file", str(key_file), "--model-name", "bge-vl-tiny"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://localhost:{port}"
        deadline = time.monotonic() + 120
        while get_or_none(f"{url}/health/ready") != 200:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
            time.sleep(0.1)
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="k3y-from-a-file", max_retries=0)
        many = [{"image": data_url(png(i, (200, 200)))} for i in range(64)]
        with ThreadPoolExecutor(1) as pool:
            job = pool.submit(api.embeddings.create, model="bge-vl-tiny", input=[], extra_body={"input": many})
            deadline = time.monotonic() + 60
            while "bgevl_api_in_flight 1.0" not in get(f"{url}/metrics")[1]:
                assert time.monotonic() < deadline and not job.done(), "the request was never seen in flight"
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            response = job.result(120)
        assert len(response.data) == 64
        assert_matches(vectors(response)[:2], embedders("tiny").encode(images=[png(0, (200, 200)), png(1, (200, 200))]))
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGTERM, out  # uvicorn re-raises the signal once it has shut down
    assert "Finished server process" in out
    assert f"http://localhost:{port}/v1/embeddings" in out and "API key required" in out
    assert "k3y-from-a-file" not in out


def get_or_none(url: str) -> int | None:
    try:
        return get(url)[0]
    except OSError:
        return None


def test_bgevl_api_refuses_bad_arguments_in_one_line(tmp_path):
    for args, message in (([str(tmp_path)], "no manifest.json"), ([], "give an export directory or --triton-url"),
                          ([str(tmp_path), "--api-key-file", str(tmp_path / "none")], "cannot read it")):
        result = subprocess.run([sys.executable, "-m", "bgevl.api.cli", *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    help_text = subprocess.run([sys.executable, "-m", "bgevl.api.cli", "--help"], capture_output=True, text=True).stdout
    for option in ("--triton-url", "--api-key-file", "--max-in-flight", "--queue", "--timeout", "--max-body-bytes",
                   "--allow-image-host", "--model-name", "--host", "--port"):
        assert option in help_text


# --- the Triton backend ----------------------------------------------------------------------

def _triton(export, tmp_path):
    pytest.importorskip("tritonclient.grpc.aio", reason="needs the serving extra: pip install '.[serving]'")
    from bgevl.serving.repository import write_repository
    from bgevl.serving.server import TritonServer

    repo = write_repository(export, tmp_path / "repo", sink=None)
    return repo, TritonServer(repo, http_port=None, grpc_port=None, metrics_port=None).start()


@pytest.mark.parametrize("model", ["tiny-mllm", pytest.param("tiny-visualized", marks=pytest.mark.slow)])
def test_the_triton_backend_gives_the_runtimes_embeddings(export_dir, embedders, tmp_path, model):
    embedder = embedders(model)
    repo, triton = _triton(export_dir("fp32", model=model), tmp_path)
    try:
        backend = TritonBackend(triton.grpc_url, name=model, tokenizer_dir=repo / "bgevl_preprocess" / "1" / "processor")
        with serving(backend) as server:
            api = client(server)
            texts = api.embeddings.create(model=model, input=TEXTS)
            assert_matches(vectors(texts), embedder.encode(text=TEXTS))
            assert texts.usage.prompt_tokens > len(TEXTS)
            floats = api.embeddings.create(model=model, input=[], encoding_format="float", extra_body={"input": _items()})
            assert_matches(vectors(floats), _direct(embedder))
            queries = api.embeddings.create(model=model, input=[], extra_body={"input": _items(), "input_type": "query"})
            assert_matches(vectors(queries), _direct(embedder, role="query"))
            body = {"input": [TEXTS[0], {"image": base64.b64encode(b"no image").decode()}], "input_type": "query"}
            assert_error(post(f"{server.url}/v1/embeddings", body), 400, "input[1].image", "input[1].image", "not a readable image")
            _check_instruction(api, server, embedder, model)
            _check_truncate(api, server, embedder, model)
    finally:
        triton.stop()


LONG_TEXT = " ".join(f"word{i}" for i in range(3000))


def _check_truncate(api, server, embedder, model):
    """``truncate``: NONE (the default) refuses an over-long text naming the item, END and START give the runtime's
    vectors of the cut text, on both endpoints."""
    assert_error(post(f"{server.url}/v1/embeddings", {"input": [TEXTS[0], LONG_TEXT]}), 400, "input[1].text",
                 "input[1].text: ", "send truncate END or START")
    for mode in ("END", "START"):
        got = api.embeddings.create(model=model, input=[TEXTS[0], LONG_TEXT], extra_body={"truncate": mode})
        assert_matches(vectors(got), embedder.encode(text=[TEXTS[0], LONG_TEXT], truncate=mode))
        status, _, body = post(f"{server.url}/v2/embed", {"texts": [LONG_TEXT], "input_type": "search_query",
                                                          "embedding_types": ["float"], "truncate": mode})
        assert status == 200, body
        assert_matches(body["embeddings"]["float"], embedder.encode(text=[LONG_TEXT], role="query", truncate=mode))


def test_bgevl_serve_starts_the_api_in_front_of_its_triton(export_dir, embedders, tmp_path):
    """bgevl-serve's API in front of its Triton, traced (--otlp-endpoint): one request's spans from the API through
    the Triton call."""
    from otlp_collector import collector
    from test_tracing import TRACEPARENT, check_request_trace
    from test_triton_server import ctrl_c, kill_group, launch_serve

    from bgevl.api.tracing import (
        SPAN_DECODE, SPAN_DECODE_BUDGET, SPAN_MODEL_CALL, SPAN_QUEUE_WAIT, SPAN_READ_BODY, SPAN_TRITON,
    )
    from bgevl.serving.repository import write_repository

    embedder = embedders("tiny")
    repo = write_repository(export_dir("fp32", model="tiny"), tmp_path / "repo", sink=None)
    with collector() as otlp:
        proc, out, ports = launch_serve(repo, "--otlp-endpoint", otlp.url)
        try:
            assert f"API      http://localhost:{ports[3]}/v1/embeddings" in out, out
            api = openai.OpenAI(base_url=f"http://localhost:{ports[3]}/v1", api_key="unused", max_retries=0)
            traced = api.embeddings.create(model="bgevl", input=TEXTS, extra_headers={"traceparent": TRACEPARENT})
            assert_matches(vectors(traced), embedder.encode(text=TEXTS))
            _check_serving_through_triton(api, embedder)
            rest = ctrl_c(proc)
        finally:
            kill_group(proc)
        # one request through bgevl-serve: the API's spans, the Triton call under its model call
        spans = [s for s in otlp.wait_for(6) if s.trace_id == TRACEPARENT.split("-")[1]]
    _, children = check_request_trace(
        spans, "/v1/embeddings", {SPAN_READ_BODY, SPAN_QUEUE_WAIT, SPAN_DECODE, SPAN_DECODE_BUDGET, SPAN_MODEL_CALL})
    [call] = [s for s in children if s.name == SPAN_MODEL_CALL]
    [infer] = [s for s in spans if s.parent_id == call.span_id]
    assert infer.name == SPAN_TRITON and infer.attributes == {"bgevl.model": "bgevl", "bgevl.items": 3}
    assert proc.returncode == 0 and "stopped (exit code 0)" in rest, out + rest
    assert "stopping the embeddings API" in rest


def _check_serving_through_triton(api, embedder):
    mixed = api.embeddings.create(model="bgevl", input=[], encoding_format="float", extra_body={"input": _items()})
    assert_matches(vectors(mixed), _direct(embedder))
    with ThreadPoolExecutor(8) as pool:  # concurrent requests through the asyncio client
        outs = list(pool.map(lambda i: api.embeddings.create(model="bgevl", input=[TEXTS[i % 3]]), range(24)))
    for i, response in enumerate(outs):
        assert_matches(vectors(response), embedder.encode(text=[TEXTS[i % 3]]))


@pytest.mark.slow
def test_bgevl_serve_no_api_serves_triton_alone(export_dir, tmp_path):
    from test_triton_server import ctrl_c, kill_group, launch_serve

    from bgevl.serving.repository import write_repository

    repo = write_repository(export_dir("fp32", model="tiny"), tmp_path / "repo", sink=None)
    no_api, out, ports = launch_serve(repo, "--no-api")
    try:
        assert "ready:" in out and "API " not in out, out
        assert get_or_none(f"http://localhost:{ports[3]}/health/live") is None  # nothing listens on the API port
        rest = ctrl_c(no_api)
    finally:
        kill_group(no_api)
    assert no_api.returncode == 0 and "embeddings API" not in rest, rest


# --- load: 64 clients, mixed items, bounded in time and count --------------------------------

def _rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@contextmanager
def api_process(export, *extra: str):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bgevl.api.cli", str(export), "--port", str(port), "--provider", "cpu",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://localhost:{port}"
        deadline = time.monotonic() + 120
        while get_or_none(f"{url}/health/ready") != 200:
            assert proc.poll() is None and time.monotonic() < deadline, "bgevl-api did not start"
            time.sleep(0.1)
        yield proc, url
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_load(url: str, embedder, seconds: float, clients: int = 64, max_requests: int = 200_000) -> dict:
    """``clients`` threads posting mixed requests (texts, images, composed) until ``seconds`` pass; every 200
    is checked against the runtime's embeddings. Returns counts by status and the failures seen."""
    jobs = [({"input": [TEXTS[i]]}, embedder.encode(text=[TEXTS[i]])) for i in range(3)]
    jobs += [({"input": [{"image": data_url(IMAGES[i])}]}, embedder.encode(images=[IMAGES[i]])) for i in range(3)]
    jobs += [({"input": [{"text": TEXTS[i], "image": data_url(IMAGES[i])}, TEXTS[(i + 1) % 3]]},
              np.concatenate([embedder.encode(images=[IMAGES[i]], text=[TEXTS[i]]), embedder.encode(text=[TEXTS[(i + 1) % 3]])]))
             for i in range(3)]
    counts: dict = {}
    failures: list = []
    lock = threading.Lock()
    sent = iter(range(max_requests))
    deadline = time.monotonic() + seconds

    def client_loop(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while time.monotonic() < deadline:
            with lock:
                if next(sent, None) is None:
                    return
            body, want = jobs[int(rng.integers(len(jobs)))]
            try:
                status, headers, answer = post(url + "/v1/embeddings", {**body, "encoding_format": "float"})
            except OSError as exc:  # a lost request: connection refused, reset, timed out
                status, headers, answer = "lost", {}, repr(exc)
            ok = status == 200 and np.allclose([d["embedding"] for d in answer["data"]], want, atol=1e-4)
            with lock:
                counts[status] = counts.get(status, 0) + 1
                if status == 429 and headers.get("retry-after") != "1":
                    failures.append(("429 without Retry-After", headers))
                elif status not in (200, 429) or (status == 200 and not ok):
                    failures.append((status, str(answer)[:300]))

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    return {"counts": counts, "failures": failures}


def _load_test(export_dir, embedders, seconds: float) -> None:
    export, embedder = export_dir("fp32", model="tiny"), embedders("tiny")
    with api_process(export, "--max-in-flight", "8", "--queue", "128") as (proc, url):
        run_load(url, embedder, min(3.0, seconds / 5))  # warm-up: allocator pools, thread stacks
        start_mb = _rss_mb(proc.pid)
        result = run_load(url, embedder, seconds)
        end_mb = _rss_mb(proc.pid)
    total = sum(result["counts"].values())
    print(f"\nload {seconds:g} s, 64 clients: {result['counts']} ({total / seconds:.0f} req/s); server RSS "
          f"{start_mb:.0f} -> {end_mb:.0f} MB")
    assert not result["failures"], result["failures"][:5]
    assert set(result["counts"]) == {200} and total > 64
    assert end_mb - start_mb < 100, (start_mb, end_mb)
    with api_process(export, "--max-in-flight", "2", "--queue", "4") as (proc, url):  # a queue far below 64 clients
        result = run_load(url, embedder, min(5.0, seconds))
    print(f"queue 4 below the load: {result['counts']}")
    assert not result["failures"], result["failures"][:5]
    assert result["counts"].get(429, 0) > 0 and result["counts"].get(200, 0) > 0
    assert set(result["counts"]) <= {200, 429}


def test_64_clients_of_mixed_items_for_10_s_lose_nothing(export_dir, embedders):
    _load_test(export_dir, embedders, 10)


@pytest.mark.slow
def test_64_clients_of_mixed_items_for_60_s_lose_nothing_and_memory_stays_flat(export_dir, embedders):
    _load_test(export_dir, embedders, 60)


def test_a_model_unloaded_under_the_api_is_503_with_retry_after_then_served_again(export_dir, embedders, tmp_path):
    """What bgevl-serve does while it reloads a dead model (the model and its callers unloaded): the API in front
    of Triton answers 503 with Retry-After, not 500 with a traceback, and serves again once it is back."""
    from bgevl.serving.server import ADMIN_HEADER

    embedder = embedders("tiny")
    repo, triton = _triton(export_dir("fp32"), tmp_path)
    try:
        backend = TritonBackend(triton.grpc_url, name="bgevl", tokenizer_dir=repo / "bgevl_preprocess" / "1" / "processor")
        with serving(backend) as server:
            assert post(f"{server.url}/v1/embeddings", {"input": TEXTS})[0] == 200
            control = urllib.request.Request(f"http://{triton.http_url}/v2/repository/models/bgevl/unload", data=b"{}",
                                             method="POST", headers={ADMIN_HEADER: triton.admin_key})
            with urllib.request.urlopen(control, timeout=60) as answer:
                assert answer.status == 200
            status, headers, body = post(f"{server.url}/v1/embeddings", {"input": TEXTS})
            assert status == 503 and headers["retry-after"] == "5" and body["error"]["code"] == "not_ready", body
            assert "not ready" in body["error"]["message"] and "Traceback" not in body["error"]["message"]
            control = urllib.request.Request(f"http://{triton.http_url}/v2/repository/models/bgevl/load", data=b"{}",
                                             method="POST", headers={ADMIN_HEADER: triton.admin_key})
            with urllib.request.urlopen(control, timeout=120) as answer:
                assert answer.status == 200
            status, _, body = post(f"{server.url}/v1/embeddings", {"input": TEXTS, "encoding_format": "float"})
            assert status == 200
            assert_matches([d["embedding"] for d in body["data"]], embedder.encode(text=TEXTS))
    finally:
        triton.stop()


def test_request_bodies_are_bounded_across_requests_before_the_in_flight_limit(embedders):
    """64 concurrent 31 MiB bodies took 1.7 GB before the in-flight limit applied: the bytes of bodies held at once
    are bounded (--max-buffered-bytes), a body past the bound is a 503 with Retry-After while the others arrive,
    and the budget comes back when they are answered."""
    import socket
    import urllib.parse

    embedder = embedders("tiny")
    declared = 2 * 2 ** 20
    with serving(backend_of(embedder), max_body_bytes=declared, max_buffered_bytes=3 * 2 ** 20) as server:
        address = urllib.parse.urlsplit(server.url)

        def start() -> socket.socket:
            conn = socket.create_connection((address.hostname, address.port), timeout=20)
            conn.sendall(f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {declared}\r\n\r\n".encode() + b'{"input": ["' + b"a" * 1000)
            return conn

        def status(conn: socket.socket) -> int:
            return int(conn.recv(4096).split(b" ", 2)[1])

        first, second = start(), start()
        first.settimeout(3)
        second.settimeout(3)
        statuses = {}
        for name, conn in (("first", first), ("second", second)):
            try:
                statuses[name] = status(conn)
            except socket.timeout:
                statuses[name] = None  # still waiting for its body: it holds its 2 MiB
        assert sorted(statuses.values(), key=str) == [503, None], statuses
        waiting = first if statuses["first"] is None else second
        waiting.settimeout(60)
        waiting.sendall(b"a" * (declared - 1000 - len(b'{"input": ["') - len(b'"]}')) + b'"]}')
        assert status(waiting) == 400  # a text over the 32 KiB limit: what matters is that it was read and answered
        first.close()
        second.close()
        result = post(f"{server.url}/v1/embeddings", {"input": TEXTS, "pad": "x" * (declared - 2000)})
        assert result[0] == 400 and "pad" in result[2]["error"]["message"]  # the budget came back: read, then refused
        assert post(f"{server.url}/v1/embeddings", {"input": TEXTS})[0] == 200


class ImageGatedBackend(EmbedderBackend):
    """Holds each encode call with images until ``gate`` opens (bounded); texts run at once."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.gate, self.entered = threading.Event(), threading.Semaphore(0)

    def _encode(self, images, *args):
        if images is not None:
            self.entered.release()
            assert self.gate.wait(60), "the test never opened the gate"
        return super()._encode(images, *args)


def test_a_one_text_request_does_not_wait_behind_image_requests_that_hold_every_worker(embedders):
    """Two requests of near-limit images held both encode workers for seconds, and a one-text request waited
    behind them (19.4 s measured): texts run in a pool of their own."""
    embedder = embedders("tiny")
    backend = backend_of(embedder, cls=ImageGatedBackend)
    with serving(backend) as server, ThreadPoolExecutor(2) as pool:
        url = f"{server.url}/v1/embeddings"
        images = [pool.submit(post, url, {"input": [{"image": data_url(IMAGES[i])}]}) for i in range(2)]
        assert backend.entered.acquire(timeout=30) and backend.entered.acquire(timeout=30)  # both workers held
        started = time.monotonic()
        status, _, body = post(url, {"input": TEXTS[:1], "encoding_format": "float"})
        assert status == 200 and time.monotonic() - started < 30
        assert_matches([body["data"][0]["embedding"]], embedder.encode(text=TEXTS[:1]))
        assert not any(f.done() for f in images)  # the image requests were still held meanwhile
        backend.gate.set()
        assert all(f.result(timeout=60)[0] == 200 for f in images)


def test_slow_heads_are_closed_and_connections_are_bounded_with_one_log_line_per_condition(embedders, caplog):
    """A client sending a header byte a second held its connection for ever, and 1,100 of them exhausted the
    descriptors (a traceback per refused accept). Now a head must arrive within --header-timeout, connections
    over --max-connections are closed when accepted, and each condition is one log line, not one per connection."""
    import socket
    import urllib.parse

    embedder = embedders("tiny")
    with caplog.at_level(logging.WARNING, logger="bgevl.api"), \
            serving(backend_of(embedder), header_timeout_s=1.0, max_connections=4) as server:
        address = urllib.parse.urlsplit(server.url)
        slow = []
        for _ in range(8):  # a head that never ends
            conn = socket.create_connection((address.hostname, address.port), timeout=10)
            conn.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n")
            slow.append(conn)
        def closed(conn: socket.socket) -> bool:
            try:
                return conn.recv(1024) == b""
            except ConnectionResetError:  # closed with the unread head in its buffer
                return True

        started = time.monotonic()
        for conn in slow:
            assert closed(conn)  # closed by the server: at once over the limit, or after 1 s
        assert time.monotonic() - started < 8
        assert post(f"{server.url}/v1/embeddings", {"input": TEXTS})[0] == 200  # a healthy client is served
        keep_alive = socket.create_connection((address.hostname, address.port), timeout=10)
        body = json.dumps({"input": TEXTS[:1]}).encode()
        keep_alive.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        answer = b""
        while b"\r\n\r\n" not in answer:  # the whole response: its head, then the body it declares
            answer += keep_alive.recv(65536)
        head, _, rest = answer.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        while len(rest) < length:
            rest += keep_alive.recv(65536)
        assert head.startswith(b"HTTP/1.1 200")
        keep_alive.sendall(b"GET /v1/models HTTP/1.1\r\n")  # the next head on the kept-alive connection: too slow
        started = time.monotonic()
        assert closed(keep_alive) and time.monotonic() - started < 8
    lines = [r.getMessage() for r in caplog.records if r.name == "bgevl.api"]
    assert sum("request head was not complete within 1 s" in line for line in lines) == 1, lines
    assert sum("over the limit of 4 open connections" in line for line in lines) == 1, lines


# --- compact embeddings: vLLM's embed_dtype, Cohere's /v2/embed --------------------------------

def test_embed_dtype_sends_float16_and_bfloat16_base64_vectors(clip):
    from bgevl.core.compact import quantize

    server, embedder = clip
    direct = embedder.encode(text=TEXTS)
    # the real openai client, asked for base64, hands the strings over as they came
    response = client(server).embeddings.create(model="bgevl", input=TEXTS, encoding_format="base64",
                                                extra_body={"embed_dtype": "float16"})
    halves = np.stack([np.frombuffer(base64.b64decode(d.embedding), "<f2") for d in response.data])
    assert halves.dtype == np.float16 and np.abs(halves.astype(np.float32) - direct).max() <= 2 ** -11
    for dtype, numpy_type in (("float16", "<f2"), ("bfloat16", "<u2"), ("float32", "<f4")):
        status, _, body = post(f"{server.url}/v1/embeddings", {"input": TEXTS, "encoding_format": "base64",
                                                                 "embed_dtype": dtype})
        assert status == 200, body
        got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), numpy_type) for d in body["data"]])
        np.testing.assert_array_equal(got, quantize(direct, dtype))
    assert_error(post(f"{server.url}/v1/embeddings", {"input": TEXTS, "embed_dtype": "float16"}), 400, "embed_dtype",
                 "applies to base64 output")
    assert_error(post(f"{server.url}/v1/embeddings", {"input": TEXTS, "encoding_format": "base64", "embed_dtype": "int4"}),
                 400, "embed_dtype")


@pytest.fixture(scope="module")
def clip_with_ranges(embedders, tmp_path_factory):
    """The API with the export's calibration ranges (bgevl-export ranges, on the built-in set)."""
    from bgevl.core.compact import EmbeddingRanges
    from bgevl.runtime.ranges import compute_ranges

    embedder = embedders("tiny")
    directory = tmp_path_factory.mktemp("ranges")
    import shutil

    shutil.copytree(embedder.manifest.directory, directory / "export")
    compute_ranges(directory / "export", size=16)
    ranges = EmbeddingRanges.load(directory / "export")
    with serving(backend_of(embedder), ranges=ranges) as server:
        yield server, embedder, ranges


def test_cohere_v2_embed_answers_every_embedding_type_as_the_runtime_quantized(clip_with_ranges):
    from bgevl.core.compact import quantize

    server, embedder, ranges = clip_with_ranges
    types = ["float", "int8", "uint8", "binary", "ubinary", "base64"]
    cases = [
        ({"texts": TEXTS}, embedder.encode(text=TEXTS)),
        ({"images": [data_url(i) for i in IMAGES]}, embedder.encode(images=IMAGES)),
        ({"inputs": [{"content": [{"type": "text", "text": TEXTS[0]},
                                  {"type": "image_url", "image_url": {"url": data_url(IMAGES[0])}}]},
                     {"content": [{"type": "text", "text": TEXTS[1]}]}]},
         np.concatenate([embedder.encode(images=IMAGES[:1], text=TEXTS[:1]), embedder.encode(text=TEXTS[1:2])])),
    ]
    for request, direct in cases:
        status, _, body = post(f"{server.url}/v2/embed", {"model": "bgevl", "input_type": "search_document",
                                                          "embedding_types": types, **request})
        assert status == 200, body
        assert body["id"].startswith("embd-") and body["meta"]["api_version"] == {"version": "2"}
        assert body["meta"]["billed_units"]["input_tokens"] >= 0 and set(body["embeddings"]) == set(types)
        assert_matches(body["embeddings"]["float"], direct)
        for kind, output in (("int8", "int8"), ("uint8", "uint8"), ("binary", "binary"), ("ubinary", "ubinary")):
            np.testing.assert_array_equal(np.array(body["embeddings"][kind]), quantize(direct, output, ranges))
        floats = np.stack([np.frombuffer(base64.b64decode(v), "<f4") for v in body["embeddings"]["base64"]])
        assert_matches(floats, direct)
    assert body["texts"] == [TEXTS[0], TEXTS[1]]
    assert body["meta"]["billed_units"]["images"] == 1


@pytest.mark.parametrize("body,param,fragment", [
    ({"texts": TEXTS, "embedding_types": ["int8"]}, "embedding_types", "bgevl-export ranges"),
    ({"texts": TEXTS, "truncate": "MIDDLE"}, "truncate", "Input should be 'NONE', 'START' or 'END'"),
    ({"texts": [" ".join(["word"] * 500)]}, "texts[0].text", "over the model's limit of 77; shorten it or send truncate"),
    ({"texts": TEXTS, "max_tokens": 16}, "max_tokens", "max_tokens: not applied"),
    ({"texts": TEXTS, "output_dimension": 7}, "output_dimension", "not trained for truncated"),
    ({"texts": TEXTS, "images": [data_url(IMAGES[0])]}, "texts", "one of 'texts', 'images' or 'inputs'"),
    ({"texts": TEXTS, "embedding_types": ["float", "int4"]}, "embedding_types[1]", "Input should be"),
    ({"texts": TEXTS, "dimensions": 7}, "dimensions", "unknown field 'dimensions'"),
    ({"inputs": [{"content": [{"type": "image_url", "image_url": {"url": data_url(IMAGES[0])}}] * 2}]}, "inputs[0]",
     "at most one image_url part"),
    ({"images": ["data:image/png;base64,bm90IGFuIGltYWdl"]}, "images[0].image", "images[0].image"),
])
def test_cohere_v2_embed_refuses_bad_requests_naming_the_field(clip, body, param, fragment):
    server, _ = clip
    assert_error(post(f"{server.url}/v2/embed", body), 400, param, fragment)


# --- the embedding cache ---------------------------------------------------------------------

def _metric(server, name: str) -> float:
    _, text = get(f"{server.url}/metrics")
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"{name} ") or
              line.startswith(f"{name}_total ")]
    return values[0] if values else 0.0


def test_the_cache_under_concurrent_load_answers_what_the_model_computes(embedders):
    """8 distinct items asked once each, then 56 more times from 16 threads at once: every answer is the model's
    vectors, bit for bit the same whether computed or cached, and every one of the 56 is a hit."""
    embedder = embedders("tiny")
    distinct = [[TEXTS[i % 3] + f" #{i}"] for i in range(8)]
    direct = {i: embedder.encode(text=t) for i, t in enumerate(distinct)}
    with serving(backend_of(embedder), cache_bytes=1 << 20) as server:
        def one(n: int):
            i = n % len(distinct)
            status, _, body = post(f"{server.url}/v1/embeddings", {"input": distinct[i], "encoding_format": "float"})
            return i, status, body
        answers = [one(n) for n in range(len(distinct))]  # computed, in turn
        with ThreadPoolExecutor(16) as pool:
            answers += list(pool.map(one, range(len(distinct), 64)))
        for i, status, body in answers:
            assert status == 200, body
            assert_matches([d["embedding"] for d in body["data"]], direct[i])
        by_item: dict = {}
        for i, _, body in answers:
            by_item.setdefault(i, set()).add(json.dumps(body["data"]))
        assert all(len(v) == 1 for v in by_item.values())  # bit for bit the same, hit or computed
        hits, misses = _metric(server, "bgevl_api_cache_hits"), _metric(server, "bgevl_api_cache_misses")
        assert (hits, misses) == (56, 8)


def test_a_cached_answer_is_the_computed_one_bit_for_bit_and_counted(embedders):
    embedder = embedders("tiny")
    items = _items()
    with serving(backend_of(embedder), cache_bytes=1 << 20) as server:
        body = {"input": items, "encoding_format": "base64", "input_type": "query"}
        status, _, first = post(f"{server.url}/v1/embeddings", body)
        assert status == 200 and _metric(server, "bgevl_api_cache_misses") == len(items)
        assert_matches(np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in first["data"]]),
                       _direct(embedder, role="query"))
        status, _, again = post(f"{server.url}/v1/embeddings", body)
        assert status == 200 and again["data"] == first["data"]  # the same bytes
        assert _metric(server, "bgevl_api_cache_hits") == len(items) and again["usage"]["prompt_tokens"] == 0
        # another role is another key (it changes the vector in families with roles)
        post(f"{server.url}/v1/embeddings", {**body, "input_type": "document"})
        assert _metric(server, "bgevl_api_cache_misses") == 2 * len(items)
        assert 0 < _metric(server, "bgevl_api_cache_bytes") <= 1 << 20


def test_the_cache_is_bounded_in_bytes_and_evicts_the_least_recently_used():
    from bgevl.api.cache import ENTRY_OVERHEAD, EmbeddingCache, parse_size

    vector = np.ones(32, np.float32)
    cost = vector.nbytes + ENTRY_OVERHEAD
    cache = EmbeddingCache(3 * cost)
    keys = [EmbeddingCache.key("m", "text", f"t{i}", None, None, None) for i in range(4)]
    for key in keys[:3]:
        cache.put(key, vector * 1)
    assert cache.get(keys[0]) is not None  # now the most recently used
    cache.put(keys[3], vector)
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is not None and cache.held == 3 * cost
    assert EmbeddingCache.key("m", "text", "a", None, "query", None) != EmbeddingCache.key("m", "text", "a", None, None, None)
    assert EmbeddingCache.key("m", "text", "a", None, None, "") != EmbeddingCache.key("m", "text", "a", None, None, None)
    assert EmbeddingCache.key("other", "text", "a", None, None, None) != EmbeddingCache.key("m", "text", "a", None, None, None)
    assert (parse_size("512M"), parse_size("2G"), parse_size("1000"), parse_size("0")) == (512 << 20, 2 << 30, 1000, 0)
    with pytest.raises(ValueError, match="give bytes or a size such as 512M"):
        parse_size("lots")


def test_embedding_ranges_are_given_to_an_api_in_front_of_triton(tmp_path):
    """--embedding-ranges: the file (or a directory holding it), refused in one line when missing or broken."""
    from bgevl.api.cli import api_options, build_parser
    from bgevl.core.compact import EmbeddingRanges
    from bgevl.core.errors import BgevlError

    EmbeddingRanges.of(np.eye(4, dtype=np.float32), "eye").save(tmp_path)
    for path in (tmp_path, tmp_path / "embedding_ranges.json"):
        options = api_options(build_parser().parse_args(["--triton-url", "localhost:8001", "--embedding-ranges", str(path)]))
        assert options.ranges is not None and options.ranges.source == "eye"
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "embedding_ranges.json").write_text("{}")
    for path, message in ((tmp_path / "missing", "no embedding_ranges.json there"), (tmp_path / "broken", "not a calibration ranges file")):
        with pytest.raises(BgevlError, match=message):
            api_options(build_parser().parse_args(["--triton-url", "x:1", "--embedding-ranges", str(path)]))
