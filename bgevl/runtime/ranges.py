"""The calibration ranges of an export's int8/uint8 embeddings (``bgevl.core.compact``): each dimension's
[low, high] over the export's own embeddings of a named calibration set, computed once and stored with the
export (``embedding_ranges.json``), so that the API's queries and ``bgevl-embed``'s corpus quantize alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from bgevl.core.compact import EmbeddingRanges


def calibration_embeddings(embedder: Any, images: list[Any], texts: list[str]) -> np.ndarray:
    """The embeddings the ranges cover: the images and texts as candidates, and the texts as queries where the
    family's queries embed differently (with its default instruction)."""
    parts = [embedder.encode(images=images), embedder.encode(text=texts)]
    if embedder.family.roles_matter:
        parts.append(embedder.encode(text=texts, role="query", instruction=embedder.default_instruction))
    return np.concatenate(parts)


def compute_ranges(export_dir: Path, data_dir: Path | None = None, size: int = 256,
                   log: Callable[[str], None] = lambda message: None) -> Path:
    """``embedding_ranges.json`` of an export from ``data_dir`` (images and ``.txt`` captions, as
    ``--calibration-data``) or, without it, the built-in synthetic set of ``size`` images and texts."""
    from bgevl.core.probes import builtin_calibration_set
    from bgevl.core.probes import load_calibration_dir
    from bgevl.runtime.embedder import Embedder

    if data_dir is not None:
        images, texts = load_calibration_dir(data_dir, "--data")
        source = str(Path(data_dir).expanduser().resolve())
    else:
        images, texts = builtin_calibration_set(size)
        source = "built-in synthetic set (bgevl.core.probes.builtin_calibration_set)"
    log(f"embedding {len(images)} images and {len(texts)} texts of {source} with {export_dir}")
    with Embedder.load(export_dir) as embedder:
        ranges = EmbeddingRanges.of(calibration_embeddings(embedder, images, texts), source)
    return ranges.save(Path(export_dir))
