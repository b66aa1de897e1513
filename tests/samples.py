"""Inputs shared by the serving tests (Triton, the embeddings API): texts, small random PNGs, and the
cosine check of served embeddings against the runtime's."""

from __future__ import annotations

import io
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

MIN_COSINE = 0.9999
TEXTS = ["a red car parked by the sea", "two dogs", "a photo of a cat sleeping on a keyboard at night"]


def png(seed: int, size=(48, 64)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


IMAGES = [png(1), png(2, (80, 40)), png(3, (64, 64))]


def png_of(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def assert_matches(served: np.ndarray, direct: np.ndarray) -> None:
    assert served.shape == direct.shape and served.dtype == np.float32
    cosine = (served * direct).sum(axis=1) / np.linalg.norm(served, axis=1) / np.linalg.norm(direct, axis=1)
    assert cosine.min() >= MIN_COSINE, cosine


def jobs_with_bad_ones(bad: str, valid: int = 30, at: tuple[int, ...] = (7, 21)) -> list[tuple[str, int | None]]:
    """``valid`` jobs ("valid", image index) with ``(bad, None)`` inserted at the positions ``at``."""
    jobs: list[tuple[str, int | None]] = [("valid", i % 3) for i in range(valid)]
    for position in at:
        jobs.insert(position, (bad, None))
    return jobs


@contextmanager
def api_process(export: Path, env: dict[str, str], timeout: float = 120) -> Iterator[Any]:
    """``bgevl-api EXPORT`` in a process of its own (``env``: e.g. a plug-in on PYTHONPATH), ready: an ``openai``
    client of it; the process is stopped at the end."""
    import openai

    from bgevl.serving.server import free_port

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "bgevl.api.cli", str(export), "--port", str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, server.stdout.read() if server.poll() else "timeout"
            time.sleep(0.3)
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
    finally:
        server.terminate()
        server.wait(30)
