"""Runtime input handling: every bad input gives an error that names the offending item."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image

from bgevl.errors import BgevlError, InputError
from bgevl.manifest import read_manifest
from bgevl.probes import synthetic_images
from bgevl.runtime import Embedder, select_providers


@pytest.fixture(scope="module")
def embedder(export_dir):
    return Embedder.load(export_dir("fp32"), provider="cpu")


@pytest.fixture(scope="module")
def png_bytes():
    buf = io.BytesIO()
    synthetic_images(1, seed=5)[0].save(buf, format="PNG")
    return buf.getvalue()


def test_paths_bytes_and_pil_images_embed_identically(embedder, png_bytes, tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(png_bytes)
    pil = Image.open(io.BytesIO(png_bytes))
    out = embedder.encode(images=[str(path), path, png_bytes, pil])
    np.testing.assert_allclose(out, np.repeat(out[:1], 4, axis=0), atol=1e-6)
    # grayscale / RGBA images are converted to RGB like BGE-VL's encode does
    assert embedder.encode(images=pil.convert("L")).shape == (1, 16)
    assert embedder.encode(images=pil.convert("RGBA")).shape == (1, 16)


def test_missing_file(embedder, png_bytes, tmp_path):
    with pytest.raises(InputError, match=r"images\[1\] '.*nope.png': file not found"):
        embedder.encode(images=[png_bytes, tmp_path / "nope.png"])


def test_non_image_file(embedder, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    with pytest.raises(InputError, match=r"images\[0\] '.*notes.txt': not a readable image"):
        embedder.encode(images=[bad])


def test_corrupt_image(embedder, png_bytes):
    with pytest.raises(InputError, match=r"images\[2\] <\d+ bytes>: the image data is corrupt or truncated"):
        embedder.encode(images=[png_bytes, png_bytes, png_bytes[: len(png_bytes) // 2]])


def test_empty_bytes_and_unsupported_type(embedder):
    with pytest.raises(InputError, match=r"images\[0\] <0 bytes>: empty byte string"):
        embedder.encode(images=[b""])
    with pytest.raises(InputError, match=r"images\[0\] <int>: unsupported image type int"):
        embedder.encode(images=[42])


def test_empty_text(embedder):
    with pytest.raises(InputError, match=r"text\[1\]: empty text"):
        embedder.encode(text=["a cat", "   "])
    with pytest.raises(InputError, match=r"text\[0\]: expected a string, got int"):
        embedder.encode(text=[3])


def test_overlong_text_truncates_with_warning_or_raises(export_dir, embedder, caplog):
    long_text = "a very long caption " * 30
    with caplog.at_level(logging.WARNING, logger="bgevl"):
        out = embedder.encode(text=["short", long_text])
    assert out.shape == (2, 16)
    assert "truncating text[1]" in caplog.text and "limit of 77 tokens" in caplog.text
    strict = Embedder.load(export_dir("fp32"), provider="cpu", text_overflow="error")
    with pytest.raises(InputError, match=r"text\[1\] \(\d+ tokens\) over the model's limit of 77 tokens"):
        strict.encode(text=["short", long_text])


def test_unpaired_batch(embedder, png_bytes):
    with pytest.raises(InputError, match="got 2 images and 3 texts"):
        embedder.encode(images=[png_bytes, png_bytes], text=["a", "b", "c"])
    with pytest.raises(InputError, match="needs images, text or both"):
        embedder.encode()
    with pytest.raises(InputError, match="empty list"):
        embedder.encode(text=[])


def test_provider_selection():
    cpu, cuda, trt = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
    assert select_providers("auto", [cpu]) == [cpu]
    assert select_providers("auto", [trt, cuda, cpu]) == [trt, cuda, cpu]
    assert select_providers("auto", [cuda, cpu]) == [cuda, cpu]
    assert select_providers("cuda", [trt, cuda, cpu]) == [cuda, cpu]
    with pytest.raises(BgevlError, match="not available in this onnxruntime build.*onnxruntime-gpu"):
        select_providers("tensorrt", [cpu])
    with pytest.raises(BgevlError, match="choose auto"):
        select_providers("rocm", [cpu])


def test_load_errors_name_the_fix(tmp_path):
    with pytest.raises(BgevlError, match="run `bgevl-export"):
        Embedder.load(tmp_path / "missing")
    (tmp_path / "other").mkdir()
    with pytest.raises(BgevlError, match="not a bgevl-export output"):
        read_manifest(tmp_path / "other")
