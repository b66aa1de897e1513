"""Inputs shared by the serving tests (Triton, the embeddings API): texts, small random PNGs, and the
cosine check of served embeddings against the runtime's."""

from __future__ import annotations

import io

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
