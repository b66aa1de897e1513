"""Runtime input handling: every bad input gives an error that names the offending item."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image

from bgevl.core.errors import BgevlError, InputError
from bgevl.core.manifest import read_manifest
from bgevl.core.probes import synthetic_images
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


# --- bounded cost of hostile inputs ----------------------------------------------------------


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def test_extreme_aspect_ratio_and_pixel_count_are_refused_from_the_header(embedder, export_dir, tmp_path):
    """A few hundred bytes that would cost gigabytes: refused before decoding, fast, without memory growth
    (the peak is measured in a fresh process, where an earlier test's peak cannot hide it)."""
    import subprocess
    import sys
    import time

    thin = _png(Image.new("L", (40000, 2)))
    huge = _png(Image.new("1", (13000, 13000)))  # 169 M pixels, under Pillow's own bomb limit
    assert len(thin) < 1000 and len(huge) < 100_000
    start = time.perf_counter()
    with pytest.raises(InputError, match=r"images\[1\] <\d+ bytes>: 40000x2 has an aspect ratio of 20000:1, over the limit of 20:1"):
        embedder.encode(images=[png_bytes_of(8), thin])
    with pytest.raises(InputError, match=r"images\[0\] <\d+ bytes>: 13000x13000 is 169.0 M pixels, over the limit of 40.0 M"):
        embedder.encode(images=[huge])
    assert time.perf_counter() - start < 1.0
    (tmp_path / "thin.png").write_bytes(thin)
    (tmp_path / "huge.png").write_bytes(huge)
    script = f"""
import resource, sys
from bgevl.core.errors import InputError
from bgevl.runtime import Embedder
emb = Embedder.load({str(export_dir("fp32"))!r}, provider="cpu")
emb.encode(text="warm up")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for name in ("thin.png", "huge.png"):
    try:
        emb.encode(images=[{str(tmp_path)!r} + "/" + name])
    except InputError:
        pass
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""
    grown = float(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()[-1])
    assert grown < 50, f"refusing the two images raised the peak memory by {grown:.0f} MB"


def png_bytes_of(size: int) -> bytes:
    return _png(synthetic_images(1, seed=size)[0])


def test_pillow_decompression_bomb_is_an_input_error(embedder):
    bomb = _png(Image.new("1", (20000, 10000)))  # 200 M pixels: Pillow's Image.open refuses it itself
    with pytest.raises(InputError, match=r"images\[0\] <\d+ bytes>: refused by Pillow's decompression-bomb check"):
        embedder.encode(images=[bomb])


def test_limits_are_configurable(export_dir):
    from bgevl.core.preprocessing import InputLimits

    strict = Embedder.load(export_dir("fp32"), provider="cpu", limits=InputLimits(max_image_pixels=10_000, max_text_bytes=10))
    with pytest.raises(InputError, match=r"images\[0\] <\d+ bytes>: 224x224 is 0.1 M pixels, over the limit of 0.0 M"):
        strict.encode(images=[png_bytes_of(0)])
    with pytest.raises(InputError, match=r"text\[1\]: 19 bytes, over the limit of 10 bytes per text"):
        strict.encode(text=["short", "a longer caption..."])


def test_large_jpeg_is_decoded_at_reduced_scale(embedder):
    from bgevl.core.preprocessing import InputLimits, load_image

    big = synthetic_images(1, seed=3)[0].resize((6000, 4000))
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    drafted = load_image(data, model_size=224)
    assert drafted.size == (750, 500)  # 1/8 scale still leaves a short side of at least 2 x 224
    full = load_image(data, model_size=224, limits=InputLimits(jpeg_draft_above_pixels=0))
    assert full.size == (6000, 4000)
    a = embedder.encode(images=[drafted])
    b = embedder.encode(images=[full])
    assert float(np.sum(a * b)) > 0.999


def _many_scan_jpeg(extra_scans: int) -> bytes:
    """A progressive JPEG (Pillow's: libjpeg's 10 scans) with one of its AC scans repeated ``extra_scans`` times
    before the end: valid markers, each scan decoded over the whole component (libjpeg warns of a bogus progression
    and goes on), the file growing by a few KB per scan. The DoS libjpeg-turbo's ``djpeg -maxscans`` guards
    against; hand-made scans of a few bytes each make it cost minutes at the pixel limit."""
    import struct

    buf = io.BytesIO()
    synthetic_images(1, seed=4)[0].resize((640, 480)).save(buf, format="JPEG", progressive=True, quality=60)
    data = buf.getvalue()
    segments, i = [], 2
    while data[i + 1] != 0xD9:  # the markers in order: (start, end, marker)
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
        end = i + 2 + length
        if marker == 0xDA:  # entropy-coded data runs to the next marker that is not FF00 or a restart
            while data[end] != 0xFF or data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                end += 1
        segments.append((i, end, marker))
        i = end
    last_scan = max(k for k, seg in enumerate(segments) if seg[2] == 0xDA)
    table, scan = segments[last_scan - 1], segments[last_scan]
    assert table[2] == 0xC4  # its Huffman table goes with it
    piece = data[table[0]:table[1]] + data[scan[0]:scan[1]]
    return data[:i] + piece * extra_scans + data[i:]


def test_a_jpeg_of_too_many_scans_is_refused_before_it_is_decoded(embedder):
    from bgevl.core.preprocessing import InputLimits, load_image

    standard = _many_scan_jpeg(0)
    assert standard.count(b"\xff\xda") == 10 and load_image(standard).size == (640, 480)
    assert load_image(_many_scan_jpeg(54)).size == (640, 480)  # 64 scans: the limit itself
    crafted = _many_scan_jpeg(200)
    with pytest.raises(InputError, match=r"^images\[1\] <\d+ bytes>: a JPEG of 210 scans, over the limit of 64: each "
                                         r"scan of a progressive JPEG is decoded over the whole image"):
        embedder.encode(images=[standard, crafted])
    assert load_image(crafted, limits=InputLimits(max_jpeg_scans=0)).size == (640, 480)  # the check off


def test_the_decode_cost_counts_pixels_and_a_jpegs_scans():
    from bgevl.core.preprocessing import decode_cost

    assert decode_cost(png_bytes_of(0)) == 224 * 224
    assert decode_cost(_many_scan_jpeg(0)) == 640 * 480  # a standard progressive JPEG: 10 scans
    assert decode_cost(_many_scan_jpeg(54)) == 7 * 640 * 480  # 64 scans
    assert decode_cost(b"not an image") == 0


@pytest.mark.parametrize("text,message", [
    (b"bytes", r"text: got bytes; pass str"),
    (["ok", b"bytes"], r"text\[1\]: expected a string, got bytes"),
    (["ok", "lone \ud800 surrogate"], r"text\[1\]: not valid Unicode \(surrogates not allowed at character 5\)"),
    (["x" * 40000], r"text\[0\]: 40000 bytes, over the limit of 32768 bytes per text"),
    (42, r"text: expected one item or a list, got int"),
])
def test_bad_text_types_are_input_errors(embedder, text, message):
    with pytest.raises(InputError, match=message):
        embedder.encode(text=text)


def test_encode_streams_images_in_graph_batches(embedder, monkeypatch):
    """Images are decoded one graph batch (64) at a time, and errors name the item in the caller's list."""
    sizes = []
    real = embedder.preprocessor.pixel_values

    def spy(images, start=0):
        sizes.append(len(images))
        return real(images, start=start)

    monkeypatch.setattr(embedder.preprocessor, "pixel_values", spy)
    image = png_bytes_of(1)
    assert embedder.encode(images=[image] * 150).shape == (150, 16)
    assert sizes == [64, 64, 22]
    with pytest.raises(InputError, match=r"images\[100\] <5 bytes>: not a readable image"):
        embedder.encode(images=[image] * 100 + [b"junk!"])


def test_an_item_kind_the_family_does_not_declare_is_refused(embedder, png_bytes, monkeypatch):
    """A model without composed queries declares kinds = (image, text): a composed item is one line."""
    monkeypatch.setattr(type(embedder.family), "kinds", ("image", "text"))
    assert embedder.encode(text=["a cat"]).shape[0] == 1 and embedder.encode(images=[png_bytes]).shape[0] == 1
    with pytest.raises(InputError, match=r"^composed items: this model does not embed them \(it embeds image, text items\)$"):
        embedder.encode(images=[png_bytes], text=["a cat"])
