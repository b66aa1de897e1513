"""Deterministic inputs for validation probes and the built-in INT8 calibration set.

No data set can be downloaded here, so both are synthesized: images drawn with Pillow from a
seeded generator (varied sizes and aspect ratios, so the processor's resize and center crop are
exercised; shapes, gradients, stripes and noise, so activations cover a realistic range) and a
fixed list of retrieval-style captions of varied lengths. The probe set and the calibration set
use different seeds and captions, so validation never measures on calibration data.

For pretrained checkpoints, calibrate on real images with ``--calibration-data DIR``: the
built-in set is synthetic and gives usable but not optimal INT8 ranges.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

PROBE_SEED = 20250306
CALIBRATION_SEED = 7

PROBE_TEXTS = (
    "a photo of a cat",
    "Make the background dark, as if the camera has taken the photo at night",
    "two dogs running on a sandy beach at sunset",
    "a red double-decker bus parked next to an old stone church",
    "close-up of a bowl of ramen with an egg, green onions and slices of pork",
    "aerial view",
    "a person riding a bicycle through a busy city street in the rain, holding an umbrella",
    "change the color of the car to blue and add snow on the ground",
)

CALIBRATION_TEXTS = (
    "a dog", "a plate of food on a wooden table", "a group of people standing in front of a building",
    "a man surfing a large wave in the ocean", "show the same scene in winter", "a black and white photo of a street",
    "a cat sleeping on a laptop keyboard", "make it look like a watercolor painting",
    "an airplane flying over snow-covered mountains", "a kitchen with white cabinets and a window",
    "remove the people from the picture", "a child flying a kite in a park on a windy day",
    "the same shoes but in red leather", "a bowl of fruit", "a train arriving at a station at night",
    "a lighthouse on a rocky coast under a cloudy sky",
)

#: (width, height) of the generated images: square, landscape, portrait, small and large.
_SIZES = ((224, 224), (320, 240), (240, 320), (512, 512), (640, 360), (180, 300), (96, 96), (800, 450))


def synthetic_image(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """One RGB image: a random gradient background with random shapes and a little noise."""
    w, h = size
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0.0, 1.0, w if rng.random() < 0.5 else h, dtype=np.float32)
    ramp = (c0[None, :] * (1 - t[:, None]) + c1[None, :] * t[:, None]).astype(np.uint8)
    arr = np.broadcast_to(ramp[None, :, :], (h, w, 3)) if len(t) == w else np.broadcast_to(ramp[:, None, :], (h, w, 3))
    img = Image.fromarray(np.ascontiguousarray(arr), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 7))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(8, max(9, w // 2))), y0 + int(rng.integers(8, max(9, h // 2)))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.rectangle((x0, y0, x1, y1), fill=color)
        elif kind == 1:
            draw.ellipse((x0, y0, x1, y1), fill=color)
        else:
            draw.line((x0, y0, x1, y1), fill=color, width=int(rng.integers(2, 12)))
    noise = rng.normal(0.0, 8.0, (h, w, 3))
    out = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(out, "RGB")


def synthetic_images(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [synthetic_image(rng, _SIZES[i % len(_SIZES)]) for i in range(n)]


#: Pillow modes the probe images come in, in turn: RGB plus the modes whose conversion to RGB (and
#: its order against resizing) changes pixels: RGBA (alpha; Pillow resizes it premultiplied),
#: P (palette; resized with NEAREST) and L (grayscale).
PROBE_MODES = ("RGB", "RGBA", "P", "L")


def in_mode(image: Image.Image, mode: str, rng: np.random.Generator) -> Image.Image:
    """``image`` as a ``mode`` image: RGBA with a random alpha gradient, P with an adaptive palette."""
    if mode == "RGBA":
        w, h = image.size
        alpha = np.linspace(rng.integers(0, 128), 255, w, dtype=np.float32)[None, :].repeat(h, 0).astype(np.uint8)
        rgba = image.convert("RGBA")
        rgba.putalpha(Image.fromarray(alpha, "L"))
        return rgba
    if mode == "P":
        return image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return image.convert(mode)


@dataclass(frozen=True)
class ProbeSet:
    """Images, texts and composed (image index, text index) queries used by validation."""

    images: list[Image.Image]
    texts: list[str]
    composed: list[tuple[int, int]]

    def composed_images(self) -> list[Image.Image]:
        return [self.images[i] for i, _ in self.composed]

    def composed_texts(self) -> list[str]:
        return [self.texts[j] for _, j in self.composed]

    def describe(self) -> dict[str, Any]:
        return {
            "images": len(self.images),
            "image_sizes": sorted({im.size for im in self.images}),
            "image_modes": sorted({im.mode for im in self.images}),
            "texts": len(self.texts),
            "composed_queries": len(self.composed),
            "seed": PROBE_SEED,
            "kind": "synthetic (bgevl.core.probes)",
        }


def probe_set(n: int = 8) -> ProbeSet:
    """The fixed validation probe set: ``n`` images (in the modes of ``PROBE_MODES`` in turn), ``n`` texts,
    ``n`` composed queries."""
    rng = np.random.default_rng(PROBE_SEED + 1)
    images = [in_mode(im, PROBE_MODES[i % len(PROBE_MODES)], rng) for i, im in enumerate(synthetic_images(n, PROBE_SEED))]
    # distinct texts for any n (the sanity gate requires distinct probes to embed differently)
    texts = [PROBE_TEXTS[i % len(PROBE_TEXTS)] + (f" ({i // len(PROBE_TEXTS) + 1})" if i >= len(PROBE_TEXTS) else "")
             for i in range(n)]
    composed = [(i, (i * 3 + 1) % n) for i in range(n)]
    return ProbeSet(images, texts, composed)


def builtin_calibration_set(n: int = 32) -> tuple[list[Image.Image], list[str]]:
    """The documented built-in INT8 calibration set (synthetic images, fixed captions)."""
    texts = [CALIBRATION_TEXTS[i % len(CALIBRATION_TEXTS)] for i in range(n)]
    return synthetic_images(n, CALIBRATION_SEED), texts


#: The image files a calibration directory's images are read from
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def load_calibration_dir(directory: Path, option: str = "--calibration-data") -> tuple[list[Any], list[str]]:
    """Images (any common format) and captions (``*.txt``, one per line) from a directory (``--calibration-data``,
    ``bgevl-export ranges --data``)."""
    from bgevl.core.errors import BgevlError
    from bgevl.core.preprocessing import load_image

    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise BgevlError(f"{option} {directory}: no such directory")
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    image_files = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    texts = [line.strip() for p in files if p.suffix.lower() == ".txt" for line in p.read_text().splitlines() if line.strip()]
    if not image_files or not texts:
        raise BgevlError(
            f"{option} {directory}: found {len(image_files)} images and {len(texts)} captions; calibration needs "
            f"both: image files (png/jpg/...) and a .txt file with one caption per line"
        )
    return [load_image(p, i) for i, p in enumerate(image_files)], texts
