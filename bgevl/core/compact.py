"""Compact embeddings: the output types retrieval teams store and serve instead of float32, with
sentence-transformers' definitions (``sentence_transformers.util.quantization.quantize_embeddings``):

* ``float16``; ``bfloat16`` (the top 16 bits of float32, rounded to nearest even: numpy has no bfloat16, so
  its bit patterns are held as ``uint16``);
* ``int8`` / ``uint8``: each dimension mapped linearly from its calibration range [low, high] onto 256
  buckets, ``floor((x - low) / ((high - low) / 255))`` clipped to [0, 255] (``int8``: minus 128). The ranges
  (:class:`EmbeddingRanges`) are computed once from a named calibration set and stored with the export, so
  that a query served by the API and the corpus embedded by ``bgevl-embed`` are quantized alike;
* ``binary`` / ``ubinary``: the sign bit (x > 0), 8 dimensions per byte, most significant first
  (``np.packbits``); ``binary`` is the byte minus 128 as int8 (Cohere's and vLLM's ``binary``).

Written here in numpy rather than calling sentence-transformers: its module imports torch, which the runtime
and the API do not load. ``tests/test_compact.py`` checks every type against sentence-transformers' own
function."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from bgevl.core.errors import BgevlError

#: every output type, and those that need calibration ranges
OUTPUT_TYPES = ("float32", "float16", "bfloat16", "int8", "uint8", "binary", "ubinary")
RANGED = ("int8", "uint8")
RANGES_FILE = "embedding_ranges.json"


@dataclass(frozen=True)
class EmbeddingRanges:
    """Each dimension's [low, high] over a calibration set of embeddings, and what that set was."""

    low: NDArray[np.float32]
    high: NDArray[np.float32]
    source: str
    count: int

    @classmethod
    def of(cls, vectors: NDArray[Any], source: str) -> "EmbeddingRanges":
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim != 2 or len(vectors) < 2:
            raise BgevlError(f"calibration ranges need two embeddings or more, got {len(vectors)}; give more items")
        return cls(vectors.min(axis=0), vectors.max(axis=0), source, len(vectors))

    @property
    def array(self) -> NDArray[np.float32]:
        """sentence-transformers' ``ranges``: ``[2, dim]``, the lows then the highs."""
        return np.stack([self.low, self.high]).astype(np.float32)

    @property
    def fingerprint(self) -> str:
        """A short hash of the ranges' values: a corpus quantized with other ranges is not resumed into."""
        import hashlib

        return hashlib.sha256(self.array.tobytes()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "count": self.count, "dim": len(self.low),
                "low": [float(v) for v in self.low], "high": [float(v) for v in self.high]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "EmbeddingRanges":
        return cls(np.asarray(data["low"], np.float32), np.asarray(data["high"], np.float32), str(data["source"]),
                   int(data["count"]))

    def dumps(self) -> str:
        """The text of ``embedding_ranges.json``."""
        return json.dumps(self.to_json(), indent=1) + "\n"

    def save(self, directory: Path) -> Path:
        """``<directory>/embedding_ranges.json``, written whole (a temporary file renamed over it)."""
        path = Path(directory) / RANGES_FILE
        tmp = path.with_name(f".{RANGES_FILE}.tmp")
        tmp.write_text(self.dumps())
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> "EmbeddingRanges | None":
        """The ranges of ``path`` (``embedding_ranges.json``, or a directory holding it, such as an export);
        ``None`` where there is none; a file that is not one is refused in one line."""
        file = Path(path) / RANGES_FILE if Path(path).is_dir() else Path(path)
        if not file.is_file():
            return None
        try:
            return cls.from_json(json.loads(file.read_text()))
        except (ValueError, KeyError, TypeError) as exc:
            raise BgevlError(f"{file}: not a calibration ranges file ({type(exc).__name__}: {exc}); write it again "
                             f"with 'bgevl-export ranges'") from None


def needs_ranges(output_type: str) -> bool:
    return output_type in RANGED


def bfloat16_bits(vectors: NDArray[Any]) -> NDArray[np.uint16]:
    """float32 -> bfloat16 bit patterns, rounded to nearest even (as torch's ``.to(torch.bfloat16)``)."""
    bits = np.ascontiguousarray(vectors, np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def quantize(vectors: NDArray[Any], output_type: str, ranges: EmbeddingRanges | None = None) -> NDArray[Any]:
    """``vectors`` (float32, ``[n, dim]``) as ``output_type``; ``int8``/``uint8`` need ``ranges``."""
    vectors = np.asarray(vectors, np.float32)
    if output_type not in OUTPUT_TYPES:
        raise BgevlError(f"output type {output_type!r}: choose one of {', '.join(OUTPUT_TYPES)}")
    if output_type == "float32":
        return vectors
    if output_type == "float16":
        return vectors.astype(np.float16)
    if output_type == "bfloat16":
        return bfloat16_bits(vectors)
    if output_type in ("binary", "ubinary"):
        packed = np.packbits(vectors > 0, axis=-1)
        return (packed.astype(np.int16) - 128).astype(np.int8) if output_type == "binary" else packed
    if ranges is None:
        raise BgevlError(f"{output_type} embeddings need calibration ranges; compute them once with "
                         f"'bgevl-export ranges EXPORT_DIR --data DIR'")
    if len(ranges.low) != vectors.shape[-1]:
        raise BgevlError(f"the calibration ranges are of {len(ranges.low)} dimensions, the embeddings of "
                         f"{vectors.shape[-1]}: they belong to another model; compute them again")
    steps = (ranges.high - ranges.low) / 255
    steps = np.where(steps == 0, 1, steps)
    buckets = np.clip(np.floor((vectors - ranges.low) / steps), 0, 255)
    return (buckets - 128).astype(np.int8) if output_type == "int8" else buckets.astype(np.uint8)


def to_base64(array: NDArray[Any]) -> str:
    """One vector's bytes, little-endian (vLLM's and OpenAI's base64 embeddings), in base64."""
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return base64.b64encode(np.ascontiguousarray(little).tobytes()).decode("ascii")
