"""Generated Triton repositories on a real server (the CPU tritonserver of the nvidia-pytriton wheel).

Embeddings over HTTP and gRPC are compared with ``bgevl.runtime`` on the same export; bad requests
must come back as Triton errors naming the problem while the server keeps serving; every server
started here is stopped, with no process of its group left.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("tritonclient.grpc", reason="needs the serving extra: pip install '.[serving]'")
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from samples import IMAGES, TEXTS, assert_matches, jobs_with_bad_ones, png_of  # noqa: E402

from bgevl.core.errors import BgevlError  # noqa: E402
from bgevl.core.family import Request  # noqa: E402
from bgevl.runtime import Embedder  # noqa: E402
from bgevl.families.dual_encoder.preprocessing import DualEncoderPreprocessor  # noqa: E402
from bgevl.serving.configs import check_ensemble_wiring, parse_pbtxt  # noqa: E402
from bgevl.serving.repository import write_repository  # noqa: E402
from bgevl.serving.server import TritonServer, free_port, free_ports  # noqa: E402

CLIENTS = {"http": httpclient, "grpc": grpcclient}


def bytes_input(module, name: str, values: list[bytes]):
    tensor = module.InferInput(name, [len(values), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(values, dtype=object).reshape(-1, 1))
    return tensor


def request(module, images=None, texts=None, **extra):
    inputs = []
    if texts is not None:
        inputs.append(bytes_input(module, "TEXT", [t.encode() for t in texts]))
    if images is not None:
        inputs.append(bytes_input(module, "IMAGE", list(images)))
    for name, value in extra.items():
        n = len(texts if texts is not None else images)
        inputs.append(bytes_input(module, name.upper(), [value.encode()] * n))
    return inputs


def client(server, protocol: str):
    return CLIENTS[protocol].InferenceServerClient(server.http_url if protocol == "http" else server.grpc_url)


def embed(server, protocol: str, model: str = "bgevl", **kw) -> np.ndarray:
    return client(server, protocol).infer(model, request(CLIENTS[protocol], **kw)).as_numpy("EMBEDDING")


def started(repository) -> TritonServer:
    return TritonServer(repository, http_port=None, grpc_port=None, metrics_port=None).start()


def stopped(server: TritonServer) -> None:
    assert server.alive(), f"the server died during the tests:\n{server.log_tail()}"
    server.stop()
    assert not server.group_alive(), "a process of the server's group (server or python-backend stub) is still running"


@pytest.fixture(scope="module")
def clip_export(export_dir):
    return export_dir("fp32")


@pytest.fixture(scope="module")
def clip_served(clip_export, tmp_path_factory):
    server = started(write_repository(clip_export, tmp_path_factory.mktemp("triton") / "clip", sink=None))
    yield server, Embedder.load(clip_export, provider="cpu")
    stopped(server)


@pytest.fixture(scope="module")
def mllm_served(export_dir, tmp_path_factory):
    export = export_dir("fp32", model="tiny-mllm")
    server = started(write_repository(export, tmp_path_factory.mktemp("triton") / "mllm", sink=None))
    yield server, Embedder.load(export, provider="cpu")
    stopped(server)


# --- the repository on disk --------------------------------------------------------------


def _ready(server, path: str) -> bool:
    """Triton's readiness at one of its paths (/v2/health/ready, /v2/models/<name>/ready), through the server's client."""
    return server.ready(None if path == "/v2/health/ready" else path.split("/")[3])

@pytest.mark.parametrize("backend", ["python", "onnxruntime"])
def test_repository_configs_parse_and_follow_the_manifest(clip_export, tmp_path, backend):
    repo = write_repository(clip_export, tmp_path / "repo", backend=backend, sink=None)
    configs = {p.parent.name: parse_pbtxt(p.read_text()) for p in repo.glob("*/config.pbtxt")}
    assert set(configs) == {"bgevl", "bgevl_preprocess", "bgevl_preprocess_text", "bgevl_vision", "bgevl_text",
                            "bgevl_fusion", "bgevl_composed"}
    manifest = Embedder.load(clip_export, provider="cpu").manifest
    for graph in ("vision", "text"):
        config, spec = configs[f"bgevl_{graph}"], manifest.graph_spec(graph)
        assert config.max_batch_size == spec.inputs[0].shape[0].max
        assert [i.name for i in config.input] == spec.input_names
        if backend == "onnxruntime":
            assert config.platform == "onnxruntime_onnx" and (repo / f"bgevl_{graph}/1" / config.default_model_filename).is_file()
        else:
            assert config.backend == "python" and (repo / f"bgevl_{graph}/1/{graph}.onnx").is_file()
    check_ensemble_wiring(configs["bgevl_composed"], configs)
    assert (repo / "bgevl_preprocess/1/processor/tokenizer.json").is_file()
    empty = [d for d in repo.rglob("*") if d.is_dir() and not any(d.iterdir())]
    assert not empty, f"object stores drop empty folders: {empty}"
    assert [(i.name, i.optional) for i in configs["bgevl"].input] == [("IMAGE", True), ("TEXT", True), ("TRUNCATE", True)]
    assert [i.name for i in configs["bgevl_preprocess"].input] == ["IMAGE", "TEXT", "TRUNCATE"]
    # text-only requests: an instance of their own
    text_only = configs["bgevl_preprocess_text"]
    assert [i.name for i in text_only.input] == ["TEXT", "TRUNCATE"] and text_only.instance_group[0].count == 1
    assert configs["bgevl"].parameters["preprocess_text_model"].string_value == "bgevl_preprocess_text"
    if backend == "python":  # CLIP pads right: the text encoder cuts the padding past the longest text
        assert configs["bgevl_text"].parameters["trim_right_padding"].string_value == "attention_mask"
        assert "trim_right_padding" not in configs["bgevl_vision"].parameters


def test_repository_writer_refuses_what_it_cannot_build(clip_export, tmp_path):
    with pytest.raises(BgevlError, match="no TensorRT engines.*build-engines"):
        write_repository(clip_export, tmp_path / "trt", backend="tensorrt", sink=None)
    assert not (tmp_path / "trt").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(BgevlError, match="not empty; pass --overwrite"):
        write_repository(clip_export, tmp_path / "busy", sink=None)


def test_bundled_server_refuses_backends_it_lacks(clip_export, tmp_path):
    repo = write_repository(clip_export, tmp_path / "ort", backend="onnxruntime", sink=None)
    with pytest.raises(BgevlError, match="only the python backend.*bgevl_text \\(onnxruntime_onnx\\).*--triton-backend python"):
        TritonServer(repo)


# --- CLIP on the server ------------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("kind", ["text", "image", "composed"])
def test_clip_embeddings_match_the_runtime(clip_served, protocol, kind):
    server, embedder = clip_served
    kw = {"text": {"texts": TEXTS}, "image": {"images": IMAGES}, "composed": {"texts": TEXTS, "images": IMAGES}}[kind]
    direct = embedder.encode(images=kw.get("images"), text=kw.get("texts"))
    assert_matches(embed(server, protocol, **kw), direct)


def test_truncate_is_applied_by_the_preprocess_model(clip_served):
    """TRUNCATE (NONE / END / START), one value per request, through the dynamically batched CLIP preprocess model:
    the runtime's vectors; without it the repository keeps CLIP's own handling (cut at the end, as the runtime)."""
    server, embedder = clip_served
    long_text = " ".join(f"word{i}" for i in range(500))
    texts = [TEXTS[0], long_text]
    with pytest.raises(InferenceServerException, match=r"text\[1\]: \d+ tokens with its prompt, over the model's limit "
                                                       r"of 77; shorten it or send truncate END or START"):
        embed(server, "grpc", texts=texts, truncate="NONE")
    for protocol, mode in (("grpc", "END"), ("http", "START")):
        assert_matches(embed(server, protocol, texts=texts, truncate=mode), embedder.encode(text=texts, truncate=mode))
        assert_matches(embed(server, protocol, texts=texts, images=IMAGES[:2], truncate=mode),
                       embedder.encode(images=IMAGES[:2], text=texts, truncate=mode))
    assert_matches(embed(server, "http", texts=texts), embedder.encode(text=texts))
    with pytest.raises(InferenceServerException, match="truncate: 'MIDDLE' is not one of NONE, END, START"):
        embed(server, "http", texts=texts, truncate="MIDDLE")


def test_composed_ensemble_and_encoders_are_addressable(clip_served):
    server, embedder = clip_served
    assert_matches(embed(server, "grpc", "bgevl_composed", texts=TEXTS, images=IMAGES),
                   embedder.encode(images=IMAGES, text=TEXTS))
    pixels = DualEncoderPreprocessor.from_pretrained(embedder.manifest.processor_dir, embedder.manifest.max_text_length).pixel_values(IMAGES)
    tensor = httpclient.InferInput("pixel_values", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    out = client(server, "http").infer("bgevl_vision", [tensor]).as_numpy("image_embeds")
    assert_matches(out, embedder.encode(images=IMAGES))


def test_concurrent_requests_are_merged_by_dynamic_batching(clip_served):
    server, embedder = clip_served
    stats_client = client(server, "grpc")

    def executions(expected: int | None = None, before=(0, 0)):
        """(inferences, executions) of the text encoder; with ``expected``, waits (10 s at most) until the
        inferences since ``before`` reach it: Triton records an execution's statistics after its responses
        went out, so a client can hold every answer while the last executions are not counted yet."""
        deadline = time.monotonic() + 10
        while True:
            stats = stats_client.get_inference_statistics("bgevl_text", as_json=True)["model_stats"][0]
            counts = int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))
            if expected is None or counts[0] - before[0] >= expected or time.monotonic() > deadline:
                return counts
            time.sleep(0.05)

    before = executions()
    jobs = [{"texts": [f"{TEXTS[i % 3]} number {i}"]} if i % 2 else {"texts": [TEXTS[i % 3]], "images": [IMAGES[i % 3]]}
            for i in range(32)]
    with ThreadPoolExecutor(16) as pool:
        served = list(pool.map(lambda kw: embed(server, "grpc", **kw), jobs))
    for kw, out in zip(jobs, served):
        assert_matches(out, embedder.encode(images=kw.get("images"), text=kw["texts"]))
    inferences, runs = (a - b for a, b in zip(executions(32, before), before))
    assert inferences == 32
    # Whether the requests above overlapped at the encoder depends on the machine's load (each waits for its
    # preprocessing first); requests that are queued together must be merged: 32 sent at once, directly
    before = executions()
    feeds = embedder.preprocessor.prepare(Request(texts=[f"caption number {i}" for i in range(32)]), serving=True)
    answers, all_in = [], threading.Event()

    def collect(result, error):
        answers.append(error or result.as_numpy("text_embeds"))
        if len(answers) == 32:
            all_in.set()

    for i in range(32):  # gRPC's async_infer sends without waiting (the HTTP client's gevent pool trickles)
        tensors = []
        for name in ("input_ids", "attention_mask"):
            tensor = grpcclient.InferInput(name, [1, feeds[name].shape[1]], "INT64")
            tensor.set_data_from_numpy(feeds[name][i:i + 1])
            tensors.append(tensor)
        stats_client.async_infer("bgevl_text", tensors, callback=collect)
    assert all_in.wait(60)
    assert all(getattr(a, "shape", None) == (1, embedder.dim) for a in answers), answers
    inferences, runs = (a - b for a, b in zip(executions(32, before), before))
    assert inferences == 32
    assert runs < inferences, f"{inferences} text-encoder inferences took {runs} executions: nothing was batched"


def _wrong_dtype(module):
    tensor = module.InferInput("TEXT", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 1), np.float32))
    return [tensor]


BAD_REQUESTS = {
    "no input": (lambda m: [], "request has 0 inputs"),  # Triton rejects it before the model runs
    "undecodable image": (lambda m: request(m, images=[b"not an image at all"]), "not a readable image"),
    "truncated image": (lambda m: request(m, images=[IMAGES[0][:60]]), "corrupt or truncated"),
    "empty text": (lambda m: request(m, texts=["   "]), "empty text"),
    "invalid utf-8": (lambda m: [bytes_input(m, "TEXT", [b"\xff\xfe"])], "not valid UTF-8"),
    "wrong dtype": (_wrong_dtype, "input 'TEXT' data-type is 'FP32', but model 'bgevl' expects 'BYTES'"),
    "batch over the limit": (lambda m: request(m, texts=["a cat"] * 65), "batch-size must be <= 64"),
}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_fail_cleanly_and_the_server_keeps_serving(clip_served, protocol, case):
    server, embedder = clip_served
    make, message = BAD_REQUESTS[case]
    module = CLIENTS[protocol]
    with pytest.raises(InferenceServerException, match=message.replace("(", "\\(").replace(")", "\\)")):
        client(server, protocol).infer("bgevl", make(module))
    assert_matches(embed(server, protocol, texts=TEXTS[:1]), embedder.encode(text=TEXTS[:1]))


# --- hostile traffic: one request's failure is that request's alone ------------------------

def _status(exc: InferenceServerException) -> str:
    return str(exc.status())


def _group_peak_rss_mb(server) -> float:
    """Sum over the server and its stubs of each process's peak resident memory (VmHWM)."""
    import psutil

    parent = psutil.Process(server.process.pid)
    total = 0
    for p in [parent, *parent.children(recursive=True)]:
        for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1])
    return total / 1024


@pytest.mark.parametrize("bomb", ["13000x13000 1-bit", "Pillow bomb 20000x10000"])
def test_a_bomb_among_concurrent_valid_requests_fails_alone(clip_served, bomb):
    """30 valid image requests from 6 clients with a decompression bomb among them: only the bomb fails,
    with a 400 naming the item and no traceback or server path."""
    server, embedder = clip_served
    size = (13000, 13000) if bomb.startswith("13000") else (20000, 10000)
    payload = png_of(Image.new("1", size))
    want = embedder.encode(images=IMAGES)
    jobs = jobs_with_bad_ones("bomb")

    def send(job):
        kind, i = job
        try:
            return kind, i, embed(server, "http", images=[payload if kind == "bomb" else IMAGES[i]])
        except InferenceServerException as exc:
            return kind, i, exc

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(send, jobs))
    for kind, i, out in results:
        if kind == "valid":
            assert not isinstance(out, Exception), f"a valid request failed beside the bomb: {out}"
            assert_matches(out, want[i:i + 1])
        else:
            assert isinstance(out, InferenceServerException) and _status(out) == "400", (_status(out), str(out))
            message = str(out)
            assert "images[0]" in message and "Traceback" not in message and ".py" not in message, message


def test_a_thin_png_of_a_few_hundred_bytes_is_refused_fast_with_bounded_memory(clip_served):
    server, _ = clip_served
    thin = png_of(Image.new("L", (40000, 2)))
    assert len(thin) < 1000
    before = _group_peak_rss_mb(server)
    start = time.perf_counter()
    for protocol, status in (("http", "400"), ("grpc", "StatusCode.INVALID_ARGUMENT")):
        with pytest.raises(InferenceServerException, match="40000x2 has an aspect ratio of 20000:1") as info:
            embed(server, protocol, images=[thin])
        assert _status(info.value) == status
    assert time.perf_counter() - start < 1.0
    assert _group_peak_rss_mb(server) - before < 200  # peaks: a decode spike would show


def test_large_requests_do_not_hold_a_small_one(clip_served):
    """Two requests of eight 6300x6300 images each (each just under the pixel limit: seconds of decoding per
    request, holding both preprocess instances), then a one-text request: the text is answered while both large
    requests are still being worked on (before, it waited for a preprocess instance: up to 11 s), by the text-only
    preprocess instance, and the large requests' answers are still right."""
    server, embedder = clip_served
    large = [png_of(Image.new("1", (6300, 6300), color=i % 2)) for i in range(8)]
    finished: dict[str, float] = {}

    def send_large(key: str):
        served = client(server, "grpc").infer("bgevl", request(grpcclient, images=large), client_timeout=300)
        finished[key] = time.monotonic()
        return served.as_numpy("EMBEDDING")

    with ThreadPoolExecutor(2) as pool:
        pending = [pool.submit(send_large, key) for key in ("large-1", "large-2")]
        time.sleep(1.5)  # both large requests are being preprocessed (their decoding alone takes several seconds)
        sent = time.monotonic()
        text = embed(server, "http", texts=TEXTS[:1])
        finished["text"] = time.monotonic()
        assert not set(finished) & {"large-1", "large-2"}, "the one-text request waited for a large request to finish"
        served = [job.result(timeout=300) for job in pending]
    print(f"one-text request beside two large ones: {1e3 * (finished['text'] - sent):.0f} ms")
    assert_matches(text, embedder.encode(text=TEXTS[:1]))
    direct = embedder.encode(images=large)
    for vectors in served:
        assert_matches(vectors, direct)


def _preprocessed_items(server) -> int:
    stats = client(server, "grpc").get_inference_statistics("bgevl_preprocess", as_json=True)
    return sum(int(m.get("inference_count", 0)) for m in stats["model_stats"])


def test_a_request_its_client_cancels_stops_before_its_next_part(clip_served):
    """24 images of 3000x3000 (a third of a second of decoding each) are three parts of 8 for the entry model; the
    client's gRPC deadline passes during the first, and the entry model stops there instead of decoding 16 more."""
    server, embedder = clip_served
    before = _preprocessed_items(server)
    images = [png_of(Image.new("1", (3000, 3000), color=i % 2)) for i in range(24)]
    with pytest.raises(InferenceServerException, match="Deadline Exceeded"):
        client(server, "grpc").infer("bgevl", request(grpcclient, images=images), client_timeout=1.0)
    counts, deadline = [], time.monotonic() + 60
    while time.monotonic() < deadline and not (len(counts) > 12 and counts[-1] == counts[-13]):
        counts.append(_preprocessed_items(server) - before)  # until it has not changed for 3 s
        time.sleep(0.25)
    assert counts[-1] <= 8, f"{counts[-1]} of 24 images were preprocessed after the client's deadline in the first part"
    assert_matches(embed(server, "grpc", images=images[:2]), embedder.encode(images=images[:2]))


def test_a_bad_request_to_an_encoder_fails_alone(clip_served):
    """Requests straight to the text encoder, merged by its dynamic batcher: other sequence lengths run
    in their own call, and token ids out of the vocabulary fail only their own request."""
    server, embedder = clip_served
    pre = DualEncoderPreprocessor.from_pretrained(embedder.manifest.processor_dir, embedder.manifest.max_text_length)
    tokens = pre.tokens(TEXTS[:1], pad_to_max_length=True)
    want = embedder.encode(text=TEXTS[:1])

    def send(kind):
        ids = tokens["input_ids"].copy()
        mask = tokens["attention_mask"]
        if kind == "bad ids":
            ids[0, 1] = 10**6
        elif kind == "short":
            ids, mask = ids[:, :20], mask[:, :20]
        inputs = []
        for name, value in (("input_ids", ids), ("attention_mask", mask)):
            tensor = grpcclient.InferInput(name, list(value.shape), "INT64")
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        try:
            return kind, client(server, "grpc").infer("bgevl_text", inputs).as_numpy("text_embeds")
        except InferenceServerException as exc:
            return kind, exc

    kinds = ["valid"] * 40 + ["bad ids"] * 6 + ["short"] * 6
    np.random.default_rng(0).shuffle(kinds)
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(send, kinds))
    for kind, out in results:
        if kind == "bad ids":
            assert isinstance(out, InferenceServerException) and "bgevl_text:" in str(out), out
            assert _status(out) == "StatusCode.INVALID_ARGUMENT"
        else:
            assert not isinstance(out, Exception), f"a {kind} request failed beside bad ones: {out}"
            assert_matches(out, want)


READINESS = ["/v2/health/ready", "/v2/models/bgevl/ready", "/v2/models/bgevl_composed/ready"]


@pytest.mark.parametrize("victim", ["bgevl_text", "bgevl_preprocess"])
def test_a_killed_stub_is_seen_reported_and_its_model_reloaded_under_load(clip_export, tmp_path, victim):
    """kill -9 of a python-backend stub (what the OOM killer does) while 8 clients send requests.

    ``bgevl_text`` (one instance: it cannot serve): it, the models that call it (the BLS entry ``bgevl``,
    the ensemble ``bgevl_composed``) and the server report not ready until it is back (Triton itself
    calls all of them ready with the stub dead), then no request fails. ``bgevl_preprocess`` (two
    instances: the other one serves): it stays ready, and the death fails at most the requests that
    were inside the dead stub when it was killed: one per client, each having one request in flight
    (before: 6,227 failures in 7.4 s under 16 clients, as Triton kept giving requests to the dead stub)."""
    import threading

    server = started(write_repository(clip_export, tmp_path / "repo", sink=None))
    reports, stop = [], threading.Event()
    results: list[tuple[float, bool]] = []
    not_ready: dict[str, int] = {}
    clients = 8

    def supervise():
        while not stop.is_set():
            server.recover_dead_stubs(report=reports.append)
            time.sleep(0.5)

    def load(seed):
        http = client(server, "http")
        while not stop.is_set():
            # stamped when sent: a request already in flight on the killed stub may fail, and its
            # answer can arrive after the reload; every request sent after the recovery must succeed
            sent = time.monotonic()
            try:
                http.infer("bgevl", request(httpclient, texts=[TEXTS[seed % 3]], images=[IMAGES[seed % 3]]))
                results.append((sent, True))
            except InferenceServerException:
                results.append((sent, False))
            time.sleep(0.02)

    def watch_ready():
        while not stop.is_set():
            for path in [f"/v2/models/{victim}/ready", *READINESS]:
                if not _ready(server, path):
                    not_ready[path] = not_ready.get(path, 0) + 1
            time.sleep(0.05)

    threads = [threading.Thread(target=f, args=a)
               for f, a in [(supervise, ()), (watch_ready, ())] + [(load, (i,)) for i in range(clients)]]
    try:
        for t in threads:
            t.start()
        time.sleep(2)
        assert not not_ready, not_ready
        pid = next(p for p, model in server.stub_processes().items() if model == victim)
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        deadline = killed_at + 60
        while time.monotonic() < deadline and not any("is serving again" in r for r in reports):
            time.sleep(0.2)
        recovered_at = time.monotonic()
        time.sleep(3)  # traffic after the recovery
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    try:
        assert any(f"stub of model {victim!r} (pid {pid}) died" in r for r in reports), reports
        assert any(f"model {victim!r} is serving again" in r for r in reports), reports
        assert recovered_at - killed_at < 60
        after = [ok for sent, ok in results if sent > recovered_at]
        assert len(after) > 10 and all(after), f"{after.count(False)} of {len(after)} requests sent after the recovery failed"
        if victim == "bgevl_text":
            assert set(not_ready) == {f"/v2/models/{victim}/ready", *READINESS}, not_ready
        else:
            assert not not_ready, f"a model with a live instance left reported not ready: {not_ready}"
            failed_before = [sent for sent, ok in results if not ok and sent <= killed_at]
            failed_after = [sent for sent, ok in results if not ok and sent > killed_at]
            assert not failed_after and len(failed_before) <= clients, (
                f"{len(failed_before)} requests sent before the kill and {len(failed_after)} after it failed "
                f"(of {len(results)}), although the other preprocess instance was alive")
    finally:
        stopped(server)


def test_the_pod_probe_fails_on_a_dead_stub_that_tritons_health_endpoints_do_not_see(clip_export, tmp_path):
    """The exec probe of the generated Deployment (``python3 -m bgevl.serving.probe``), run as the kubelet
    runs it, against a real server: live and ready while every stub runs; once one is killed, Triton's
    /v2/health/live and /v2/health/ready still answer 200, the probe fails naming the model, and keeps
    failing (nothing reloads a model in a pod); a state left by another server is not held against this one."""
    server = started(write_repository(clip_export, tmp_path / "repo", sink=None))
    state = tmp_path / "probe.json"

    def probe(*extra):
        run = subprocess.run([sys.executable, "-m", "bgevl.serving.probe", "--url", f"http://{server.http_url}",
                              "--state", str(state), "--pid", str(server.process.pid), *extra],
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        return run.returncode, run.stdout.strip() + run.stderr.strip()

    try:
        stubs = server.stub_processes()
        assert sorted(set(stubs.values())) == ["bgevl", "bgevl_fusion", "bgevl_preprocess", "bgevl_preprocess_text",
                                               "bgevl_text", "bgevl_vision"]
        assert probe() == (0, f"live: {len(stubs)} python-backend stubs")
        assert probe("--ready") == (0, f"ready: {len(stubs)} python-backend stubs")
        pid = next(p for p, model in stubs.items() if model == "bgevl_text")
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pid in server.stub_processes() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.live() and server.ready()  # Triton does not see it
        want = f"python-backend stub(s) of bgevl_text (pid {pid}) died"
        for extra in ((), ("--ready",), ()):
            code, line = probe(*extra)
            assert code == 1 and want in line, line
        state.write_text(state.read_text().replace(f'"server": [{server.process.pid},', '"server": [1,'))
        assert probe() == (0, f"live: {len(stubs) - 1} python-backend stubs")  # another server's state: afresh
    finally:
        stopped(server)


# --- perf_analyzer with the input data every repository ships ---------------------------------

def test_repositories_ship_perf_analyzer_input_data(clip_export, export_dir, tmp_path):
    import base64
    import json
    import struct

    expected = {"clip": {"text", "image", "composed"}, "mllm": {"candidate_image", "candidate_text", "query"}}
    for family, export in (("clip", clip_export), ("mllm", export_dir("fp32", model="tiny-mllm"))):
        repo = write_repository(export, tmp_path / family, sink=None)
        files = {p.stem.removeprefix("perf_analyzer_"): p for p in repo.glob("perf_analyzer_*.json")}
        assert set(files) == expected[family]
        for path in files.values():
            steps = json.loads(path.read_text())["data"]
            assert len(steps) == 4
            for step in steps:
                for name, tensor in step.items():
                    raw = base64.b64decode(tensor["b64"])
                    (length,) = struct.unpack("<I", raw[:4])  # Triton's BYTES serialization: length, then bytes
                    assert tensor["shape"] == [1] and length == len(raw) - 4
                    if name == "IMAGE":
                        assert Image.open(io.BytesIO(raw[4:])).format == "JPEG"


@pytest.fixture(scope="module")
def perf_analyzer_binary():
    from bgevl.serving import perf_analyzer

    binary, why = perf_analyzer.find()
    if binary is None:
        pytest.skip(why)
    return binary


@pytest.mark.parametrize("model,workload", [("bgevl", "text"), ("bgevl", "image"), ("bgevl", "composed"),
                                            ("bgevl_composed", "composed")])
def test_perf_analyzer_runs_with_the_shipped_input_data(clip_served, perf_analyzer_binary, model, workload):
    from bgevl.serving import perf_analyzer

    server, _ = clip_served
    # any stability: this checks that the shipped input data runs, not the timings (on a busy machine
    # perf_analyzer's default check failed: "Failed to obtain stable measurement within 6 measurement windows")
    rows = perf_analyzer.run(model, server.grpc_url, server.repository / f"perf_analyzer_{workload}.json", [1, 2],
                             measurement_ms=500, binary=perf_analyzer_binary, stability_percentage=1000)
    assert [r["concurrency"] for r in rows] == [1, 2]
    assert all(r["requests_per_s"] > 0 and 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] for r in rows)


def test_perf_analyzer_runs_on_the_mllm_entry(mllm_served, perf_analyzer_binary):
    from bgevl.serving import perf_analyzer

    server, _ = mllm_served
    for workload in ("candidate_image", "candidate_text", "query"):
        [row] = perf_analyzer.run("bgevl", server.grpc_url, server.repository / f"perf_analyzer_{workload}.json", [1],
                                  measurement_ms=500, binary=perf_analyzer_binary, stability_percentage=1000)
        assert row["requests_per_s"] > 0


# --- the repository on object storage -------------------------------------------------------

def test_a_repository_on_s3_serves_what_local_serving_does(clip_export, clip_served, tmp_path):
    """A generated repository uploaded to a local S3 endpoint (moto) and read by the bundled tritonserver
    (``s3://host:port/bucket/path``): object stores keep no empty folder, so every folder of the
    repository must hold a file (the ensemble's version folder did not, and the server refused to start)."""
    import socket

    import boto3

    repo = write_repository(clip_export, tmp_path / "repo", sink=None)
    port = free_port()
    moto = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    credentials = {"AWS_ACCESS_KEY_ID": "bgevl-test", "AWS_SECRET_ACCESS_KEY": "bgevl-test", "AWS_DEFAULT_REGION": "us-east-1"}
    server = None
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", **{
            "aws_access_key_id": "bgevl-test", "aws_secret_access_key": "bgevl-test", "region_name": "us-east-1"})
        s3.create_bucket(Bucket="models")
        files = [f for f in repo.rglob("*") if f.is_file()]
        for f in files:
            s3.upload_file(str(f), "models", f"bgevl/{f.relative_to(repo)}")
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="models", Prefix="bgevl/")["Contents"]}
        assert "bgevl/bgevl_composed/1/ENSEMBLE" in keys and len(keys) == len(files)
        server = TritonServer(repo, http_port=None, grpc_port=None, metrics_port=None, env=credentials,
                              repository_uri=f"s3://127.0.0.1:{port}/models/bgevl").start(timeout=120)
        local, _ = clip_served
        for kw in ({"texts": TEXTS}, {"images": IMAGES}, {"texts": TEXTS, "images": IMAGES}):
            from_s3 = embed(server, "grpc", **kw)
            np.testing.assert_allclose(from_s3, embed(local, "grpc", **kw), atol=1e-6)
        assert_matches(embed(server, "http", "bgevl_composed", texts=TEXTS, images=IMAGES),
                       embed(local, "http", texts=TEXTS, images=IMAGES))
    finally:
        if server is not None:
            stopped(server)
        moto.kill()
        moto.wait()


# --- MLLM on the server ------------------------------------------------------------------

INSTRUCTION = "Retrieve the target image that best meets the combined criteria"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_mllm_embeddings_match_the_runtime(mllm_served, protocol):
    server, embedder = mllm_served
    cases = [
        ({"texts": TEXTS, "instruction": INSTRUCTION}, dict(text=TEXTS, role="query", instruction=INSTRUCTION)),
        ({"images": IMAGES, "role": "candidate"}, dict(images=IMAGES, role="candidate")),
        ({"texts": TEXTS[:2], "images": IMAGES[:2], "role": "query", "instruction": INSTRUCTION},
         dict(images=IMAGES[:2], text=TEXTS[:2], role="query", instruction=INSTRUCTION)),
        ({"texts": TEXTS}, dict(text=TEXTS)),  # no role, no instruction: a candidate, as in the runtime
    ]
    for request_kw, runtime_kw in cases:
        assert_matches(embed(server, protocol, **request_kw), embedder.encode(**runtime_kw))


@pytest.mark.parametrize("extra,message", [
    ({"role": "judge"}, "role"),
    ({"role": "candidate", "instruction": INSTRUCTION}, "instruction applies to queries only"),
])
def test_mllm_bad_requests_name_the_problem(mllm_served, extra, message):
    server, embedder = mllm_served
    with pytest.raises(InferenceServerException, match=message):
        embed(server, "http", texts=TEXTS[:1], **extra)
    assert_matches(embed(server, "http", texts=TEXTS[:1]), embedder.encode(text=TEXTS[:1]))


@pytest.fixture(scope="module")
def screenshot_served(export_dir, tmp_path_factory):
    export = export_dir("fp32", model="tiny-screenshot")
    server = started(write_repository(export, tmp_path_factory.mktemp("triton") / "screenshot", sink=None))
    yield server, Embedder.load(export, provider="cpu")
    stopped(server)


def test_screenshot_embeddings_match_the_runtime_with_images_of_different_sizes(screenshot_served):
    """BGE-VL-Screenshot through Triton: the entry model's recipe calls the vision model once per image (each
    image its own number of tokens; the vision model never batches two requests' tokens together), then the
    language model on the request."""
    from bgevl.families.screenshot.preprocessing import SCREENSHOT_QUERY_INSTRUCTION

    server, embedder = screenshot_served
    images = [png_of(Image.new("RGB", size, color)) for size, color in
              (((100, 60), "red"), ((300, 200), "blue"), ((90, 400), "green"))]
    texts = TEXTS
    config = parse_pbtxt((server.repository / "bgevl_screenshot_vision" / "config.pbtxt").read_text())
    assert config.max_batch_size == 0
    cases = [
        ({"images": images, "role": "candidate"}, dict(images=images, role="candidate")),
        ({"texts": texts, "images": images, "role": "query", "instruction": SCREENSHOT_QUERY_INSTRUCTION},
         dict(images=images, text=texts, role="query", instruction=SCREENSHOT_QUERY_INSTRUCTION)),
        ({"texts": texts}, dict(text=texts)),
    ]
    for protocol in ("http", "grpc"):
        for request_kw, runtime_kw in cases:
            assert_matches(embed(server, protocol, **request_kw), embedder.encode(**runtime_kw))
    with pytest.raises(InferenceServerException, match="instruction applies to queries only"):
        embed(server, "http", texts=texts[:1], role="candidate", instruction="x")


# --- bgevl-serve -------------------------------------------------------------------------

def launch_serve(repo, *extra: str, preexec_fn=None, tmpdir: Path | None = None):
    """``bgevl-serve REPO`` as a subprocess, read until it says it is ready: (process, its output, ports).
    ``tmpdir``: its TMPDIR (where the server's working directory goes)."""
    ports = free_ports(4)
    cmd = [sys.executable, "-m", "bgevl.serving.cli", str(repo), "--http-port", str(ports[0]),
           "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]), "--api-port", str(ports[3]), *extra]
    env = {**os.environ, "TMPDIR": str(tmpdir)} if tmpdir is not None else None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=preexec_fn or os.setsid, env=env)
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("Ctrl-C"):
            break
    return proc, "".join(lines), ports


def ctrl_c(proc) -> str:
    """SIGINT to bgevl-serve: the rest of its output once it has exited."""
    proc.send_signal(signal.SIGINT)
    return proc.communicate(timeout=60)[0]


def kill_group(proc) -> None:
    """Whatever a failed test left of bgevl-serve's process group."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def server_pid_of(out: str) -> int:
    return int(out.split("tritonserver pid ")[1].split(",")[0])


def group_gone(pgid: int, within: float = 20.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_bgevl_serve_starts_prints_endpoints_and_stops_on_ctrl_c(clip_export, tmp_path):
    repo = write_repository(clip_export, tmp_path / "repo", sink=None)
    proc, out, ports = launch_serve(repo)
    try:
        assert "ready: 7 models" in out, out
        assert f"HTTP     localhost:{ports[0]}" in out and f"gRPC     localhost:{ports[1]}" in out
        assert f"http://localhost:{ports[2]}/metrics" in out and "(listening on 127.0.0.1)" in out
        served = httpclient.InferenceServerClient(f"localhost:{ports[0]}").infer("bgevl", request(httpclient, texts=TEXTS[:1]))
        assert served.as_numpy("EMBEDDING").shape == (1, 16)
        server_pid = server_pid_of(out)
        workdir = out.split(", log ")[1].split()[0].rsplit("/", 1)[0]
        rest = ctrl_c(proc)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, out + rest
    assert "stopped (exit code 0)" in rest
    for group in (proc.pid, server_pid):  # bgevl-serve's group and the server's (server and stubs)
        with pytest.raises(ProcessLookupError):
            os.killpg(group, 0)
    assert not os.path.exists(workdir), "the temporary directory of a cleanly stopped server was left"


# --- safe defaults and a launcher that takes its server with it ---------------------------------

def test_default_server_listens_on_loopback_only_and_restricts_admin_apis(clip_served):
    import psutil

    server, _ = clip_served
    processes = [psutil.Process(server.process.pid)]
    listening = {(c.laddr.ip, c.laddr.port) for p in processes for c in p.net_connections("inet") if c.status == "LISTEN"}
    assert {port for _, port in listening} >= {server.http_port, server.grpc_port, server.metrics_port}
    import ipaddress

    def loopback(ip: str) -> bool:
        address = ipaddress.ip_address(ip)
        return (getattr(address, "ipv4_mapped", None) or address).is_loopback  # gRPC binds ::ffff:127.0.0.1

    assert all(loopback(ip) for ip, _ in listening), listening
    http = client(server, "http")
    with pytest.raises(InferenceServerException, match="(?i)restricted|403|permission"):
        http.register_system_shared_memory("bgevl-probe", "/bgevl-probe", 64)
    with pytest.raises(InferenceServerException, match="(?i)restricted|permission"):
        client(server, "grpc").register_system_shared_memory("bgevl-probe", "/bgevl-probe", 64)
    with pytest.raises(InferenceServerException, match="(?i)restricted|403|permission"):
        http.update_log_settings({"log_verbose_level": 1})
    # with the key, the API answers (here: an unknown region to unregister is fine)
    http.unregister_system_shared_memory("bgevl-probe", headers={"bgevl-admin": server.admin_key})
    assert embed(server, "http", texts=TEXTS[:1]).shape == (1, 16)  # inference needs no key


@pytest.mark.parametrize("how", ["SIGKILL", "SIGHUP"])
def test_no_server_outlives_its_launcher(clip_export, tmp_path, how, monkeypatch):
    repo = write_repository(clip_export, tmp_path / "repo", sink=None)
    # a TMPDIR of its own: a server started meanwhile by another test run on this machine would otherwise
    # remove the orphaned working directory this test looks for (it did, once, in a CI run beside another)
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    proc, out, _ = launch_serve(repo, tmpdir=private_tmp)
    try:
        assert "ready: 7 models" in out, out
        server_pid = server_pid_of(out)
        os.kill(proc.pid, getattr(signal, how))
        proc.wait(timeout=60)
        assert group_gone(server_pid), f"tritonserver or a stub outlived bgevl-serve after {how}"
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            os.killpg(server_pid_of(out), signal.SIGKILL)
        except (ProcessLookupError, IndexError, ValueError):
            pass
    if how == "SIGHUP":
        assert proc.returncode == 0
    else:  # SIGKILL ran no clean-up: the next start removes the orphaned temporary directory
        from bgevl.serving.server import remove_stale_workdirs

        workdir = Path(out.split(", log ")[1].split()[0]).parent
        assert workdir.is_dir() and workdir.parent == private_tmp
        monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
        remove_stale_workdirs()
        assert not workdir.exists()


def test_sigint_stops_the_server_even_when_inherited_as_ignored(clip_export, tmp_path):
    """`bgevl-serve REPO &` from a non-interactive shell starts with SIGINT ignored."""
    repo = write_repository(clip_export, tmp_path / "repo", sink=None)

    def ignore_sigint():
        os.setsid()
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    proc, out, _ = launch_serve(repo, preexec_fn=ignore_sigint)
    try:
        assert "ready: 7 models" in out, out
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "stopped (exit code 0)" in rest
        assert group_gone(server_pid_of(out))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_bgevl_serve_reports_and_recovers_a_dead_stub(clip_export, tmp_path):
    import psutil

    repo = write_repository(clip_export, tmp_path / "repo", sink=None)
    proc, out, ports = launch_serve(repo)
    try:
        assert "ready: 7 models" in out, out
        stub = next(p for p in psutil.Process(server_pid_of(out)).children(recursive=True)
                    if "bgevl_fusion/1/model.py" in " ".join(p.cmdline()))
        stub.kill()
        lines = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            lines.append(proc.stdout.readline())
            if "is serving again" in lines[-1]:
                break
        text = "".join(lines)
        assert f"the python-backend stub of model 'bgevl_fusion' (pid {stub.pid}) died; reloading bgevl_fusion" in text
        assert "model 'bgevl_fusion' is serving again" in text, text
        served = httpclient.InferenceServerClient(f"localhost:{ports[0]}").infer(
            "bgevl", request(httpclient, texts=TEXTS[:1], images=IMAGES[:1]))
        assert served.as_numpy("EMBEDDING").shape == (1, 16)

        # a model that cannot come back (here: its code no longer loads) is retried with backoff, then the
        # server is stopped and bgevl-serve exits non-zero, so that a supervisor restarts it
        (repo / "bgevl_fusion" / "1" / "model.py").write_text("raise RuntimeError('broken on purpose')\n")
        stub = next(p for p in psutil.Process(server_pid_of(out)).children(recursive=True)
                    if "bgevl_fusion/1/model.py" in " ".join(p.cmdline()))
        stub.kill()
        rest, _ = proc.communicate(timeout=120)
        assert proc.returncode == 3, rest
        assert "reloading model 'bgevl_fusion' failed (HTTP 400" in rest and "retrying in 1 s" in rest, rest
        assert "retrying in 2 s" in rest and "reloading model 'bgevl_fusion' failed 3 times" in rest, rest
        assert ("bgevl-serve: error: model(s) bgevl_fusion cannot serve (reloads failed 3 times, or its stubs died "
                "more often within 90 s); stopping the server so that a supervisor restarts it") in rest and "Traceback" not in rest.split("failed 3 times")[1], rest
        assert group_gone(server_pid_of(out))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=60)


def _stubs_of(out: str, model: str) -> list:
    import psutil

    found = []
    try:
        children = psutil.Process(server_pid_of(out)).children(recursive=True)
    except psutil.Error:  # the server has gone
        return []
    for process in children:
        try:
            if f"/{model}/1/model.py" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:  # gone meanwhile, or a zombie
            pass
    return found


def test_no_reload_loop_and_a_stub_killed_again_and_again_ends_the_server(clip_export, tmp_path):
    """An entry stub killed under load is reloaded in place once: the old instances that exit after the swap are
    not deaths (they made bgevl-serve reload the entry every few seconds for ever). Then a stub whose replacement
    is killed as soon as it appears, again and again: bgevl-serve gives up within its recovery window and exits 3
    (the server stayed up and broken for 184 s before)."""
    import contextlib

    import psutil

    repo = write_repository(clip_export, tmp_path / "repo", sink=None)
    proc, out, ports = launch_serve(repo)
    stop = threading.Event()

    def load():
        http = httpclient.InferenceServerClient(f"localhost:{ports[0]}")
        while not stop.is_set():
            try:
                http.infer("bgevl", request(httpclient, texts=TEXTS, images=IMAGES))
            except InferenceServerException:
                time.sleep(0.05)

    try:
        assert "ready: 7 models" in out, out
        with ThreadPoolExecutor(4) as pool:
            for _ in range(4):
                pool.submit(load)
            time.sleep(1.0)
            _stubs_of(out, "bgevl")[0].kill()
            lines = [proc.stdout.readline()]
            while "is serving again" not in lines[-1]:
                lines.append(proc.stdout.readline())
            time.sleep(12.0)  # 24 checks of the stubs under load after the swap
            stop.set()
        assert "reloaded in place" in "".join(lines), "".join(lines)

        started, kills = time.monotonic(), 0
        while proc.poll() is None and time.monotonic() - started < 150:
            for stub in _stubs_of(out, "bgevl_text"):
                with contextlib.suppress(ProcessLookupError, psutil.Error):
                    stub.kill()
                    kills += 1
            time.sleep(0.1)
        rest, _ = proc.communicate(timeout=60)
        elapsed = time.monotonic() - started
        # after the entry's in-place reload, no death of its stubs was seen: the old instances' exit is not one
        assert "stub of model 'bgevl' (" not in rest, rest
        assert proc.returncode == 3 and elapsed < 120, (elapsed, rest)
        assert "bgevl_text" in rest.split("bgevl-serve: error: model(s) ")[1].split(" ")[0], rest
        print(f"{kills} kills of bgevl_text's stubs: bgevl-serve exited 3 after {elapsed:.0f} s")
        assert group_gone(server_pid_of(out))
    finally:
        stop.set()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=60)


def test_a_failed_start_names_the_model_its_cause_and_the_log(clip_export, tmp_path):
    repo = write_repository(clip_export, tmp_path / "repo", sink=None)
    (repo / "bgevl_fusion" / "1" / "model.py").write_text("import bgevl_no_such_module  # broken on purpose\n")
    http, grpc, metrics = free_ports(3)
    result = subprocess.run([sys.executable, "-m", "bgevl.serving.cli", str(repo), "--http-port", str(http),
                             "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--timeout", "90"],
                            capture_output=True, text=True, timeout=150)
    assert result.returncode == 2, result.stdout + result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("bgevl-serve: error:")]
    assert len(error) == 1, result.stderr
    assert "model 'bgevl_fusion' failed to load" in error[0] and "bgevl_no_such_module" in error[0]
    log = error[0].split("(server log: ")[1].rstrip(")")
    assert os.path.isfile(log), "the log of a failed start must be kept"


def test_interpreter_check_names_the_python_to_use(tmp_path):
    from bgevl.serving.server import check_interpreter

    libpython = Path("/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0")
    check_interpreter(libpython, base_prefix="/usr")
    with pytest.raises(BgevlError, match=r"built on the Python in .*pyenv.*stub embeds /usr/lib.*python3.11 -m venv"):
        check_interpreter(libpython, base_prefix=str(tmp_path / "pyenv" / "versions" / "3.11.7"))
