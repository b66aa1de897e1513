"""``python -m bgevl.runtime.demo DIR``: embed a few inputs with an export and print their similarities."""

from __future__ import annotations

import sys

import numpy as np

from bgevl.core.probes import PROBE_TEXTS, synthetic_images
from bgevl.runtime import Embedder


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bgevl.runtime.demo EXPORT_DIR", file=sys.stderr)
        return 2
    embedder = Embedder.load(argv[0])
    m = embedder.manifest
    print(f"{m.model.source} | {m.precision} | providers {embedder.providers} | dim {embedder.dim}")
    images = synthetic_images(3, seed=1)
    texts = list(PROBE_TEXTS[:3])
    img = embedder.encode(images=images)
    txt = embedder.encode(text=texts)
    # a composed query with the family's default task instruction (the MLLM's; CLIP takes none)
    composed = embedder.encode(images=images[:1], text=[PROBE_TEXTS[1]], role="query",
                               instruction=embedder.default_instruction)
    np.set_printoptions(precision=4, suppress=True)
    print("image x text cosine similarities (rows: 3 synthetic images; columns: texts):")
    for t in texts:
        print(f"  - {t}")
    print(img @ txt.T)
    print(f"composed query (image 0 + {PROBE_TEXTS[1]!r}) x images: {composed @ img.T}")
    weights = m.model.weights
    if weights == "random":
        print("(random weights: the numbers show the pipeline works, not retrieval quality)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
