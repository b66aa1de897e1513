"""A generated evaluation set that random-weight models retrieve well above chance (tests, docs' table).

No trained weights can be downloaded here, and the towers of a random-weight model are not aligned:
text->image and image->text retrieval sit at chance whatever the data. What a random network does
keep is that nearly identical inputs give nearly identical outputs, so the composed set is built on
near-duplicates:

* ``gallery/``: ``bases`` synthetic scenes (``bgevl.core.probes.synthetic_image``), each in ``variants``
  near-duplicate versions (the scene plus a little seeded pixel noise), PNG (lossless);
* ``triplets.json`` (CIRCO's form): per scene, the reference is variant 0, the targets the other
  variants (several targets, the first one CIRCO's ``target_img_id``), the modification text one of a
  varied set of edit instructions;
* ``pairs/``: images that are their captions rendered as pixels, with the captions beside them
  (``<stem>.txt``; every fifth with a second caption line): what a trained CLIP retrieves by reading
  the text, at chance for random weights, so it exercises the pairs path and its deltas, not recall.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from bgevl.core.probes import synthetic_image

SUBJECTS = ("the sky", "the car", "the dog", "the wall", "the table", "the street", "the coat", "the boat")
EDITS = ("make {s} red", "turn {s} blue at night", "add snow on {s}", "remove {s}", "show {s} from above",
         "make {s} look like a watercolor", "put two of {s} side by side", "make {s} larger and brighter")
NOUNS = ("cat", "bicycle", "lighthouse", "bowl of soup", "train", "kite", "sofa", "mountain", "umbrella", "guitar")
PLACES = ("on a beach", "in a kitchen", "at night", "in the snow", "next to a river", "in a busy street")


def modification(index: int) -> str:
    return EDITS[index % len(EDITS)].format(s=SUBJECTS[(index // len(EDITS)) % len(SUBJECTS)]) + f", version {index}"


def caption(index: int) -> str:
    return f"a {NOUNS[index % len(NOUNS)]} {PLACES[(index // len(NOUNS)) % len(PLACES)]}, number {index}"


def near_duplicate(image, seed: int, amplitude: int = 6):
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.asarray(image, np.int16) + rng.integers(-amplitude, amplitude + 1, np.asarray(image).shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def rendered_caption(text: str, size: int = 160):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (250, 250, 245))
    draw = ImageDraw.Draw(image)
    words, lines, line = text.split(), [], ""
    for word in words:  # wrap at about 18 characters a line
        if line and len(line) + 1 + len(word) > 18:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    for n, text_line in enumerate(lines):
        draw.text((6, 8 + 14 * n), text_line, fill=(10, 10, 10))
    return image


def write_quality_data(root: Path, bases: int = 40, variants: int = 3, pairs: int = 40, seed: int = 0,
                       size: int = 128) -> Path:
    """Write the generated set (see the module's docstring) under ``root``; returns ``root``."""
    root = Path(root)
    if variants < 2:
        raise ValueError("variants must be at least 2: a reference and a target")
    rng = np.random.default_rng(seed)
    gallery = root / "gallery"
    gallery.mkdir(parents=True, exist_ok=True)
    triplets = []
    for b in range(bases):
        scene = synthetic_image(rng, (size, size))
        names = [f"scene{b:04d}_v{v}" for v in range(variants)]
        for v, name in enumerate(names):
            near_duplicate(scene, seed * 100_003 + b * 31 + v).save(gallery / f"{name}.png")
        triplets.append({"id": f"q{b:04d}", "reference_img_id": names[0], "relative_caption": modification(b),
                         "target_img_id": names[1], "gt_img_ids": names[1:]})
    (root / "triplets.json").write_text(json.dumps(triplets, indent=1))
    folder = root / "pairs"
    folder.mkdir(exist_ok=True)
    for i in range(pairs):
        text = caption(i)
        rendered_caption(text).save(folder / f"pair{i:04d}.png")
        (folder / f"pair{i:04d}.txt").write_text(text + (f"\n{caption(i + pairs)}" if i % 5 == 4 else "") + "\n")
    return root


def main(argv: list[str] | None = None) -> int:
    """``python -m bgevl.quality.synthetic DIR``: write the generated set, e.g. for ``bgevl-eval --data DIR``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m bgevl.quality.synthetic", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("output", type=Path, help="directory to write (gallery/, triplets.json, pairs/)")
    p.add_argument("--bases", type=int, default=100, help="scenes: composed queries")
    p.add_argument("--variants", type=int, default=3, help="near-duplicates per scene (the reference and its targets)")
    p.add_argument("--pairs", type=int, default=100, help="images of rendered captions")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.output.exists() and any(args.output.iterdir()):
        print(f"{p.prog}: error: {args.output} exists and is not empty; choose another directory", file=sys.stderr)
        return 2
    print(write_quality_data(args.output, args.bases, args.variants, args.pairs, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
