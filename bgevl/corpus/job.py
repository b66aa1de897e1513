"""One corpus job: an export, an input, an output folder, an engine (local threads or Ray Data)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bgevl.core.compact import EmbeddingRanges, needs_ranges
from bgevl.core.errors import BgevlError
from bgevl.core.family import IMAGE, KINDS, TEXT
from bgevl.corpus.output import CorpusOutput
from bgevl.corpus.pipeline import BatchEmbedder, ItemProgress, embed_local, needs
from bgevl.corpus.readers import FolderSource, Source, open_source

#: items per partition (one .npy per kind, one metadata file): clip-retrieval's default is 10**6 per
#: partition; 10,000 keeps a killed job's lost work to seconds or minutes and a partition's memory small
DEFAULT_PARTITION_SIZE = 10_000
#: the stored vectors' types (``bgevl.core.compact``; bfloat16 is left out: numpy and the readers of clip-retrieval's
#: layout have no such dtype)
DTYPES = ("float32", "float16", "int8", "uint8", "binary", "ubinary")


@dataclass
class CorpusOptions:
    export: Path
    input: str
    output: str
    input_format: str = "auto"
    id_column: str = "id"
    image_column: str = "image"
    text_column: str = "text"
    #: kinds to embed per item ("image", "text", "composed"); empty: what the input holds
    kinds: list[str] = field(default_factory=list)
    role: str | None = None
    instruction: str | None = None
    dtype: str = "float32"
    partition_size: int = DEFAULT_PARTITION_SIZE
    batch_size: int | None = None
    workers: int = 4
    backend: str = "onnxruntime"
    provider: str = "auto"
    threads: int | None = None
    triton: str | None = None
    triton_model: str = "bgevl"
    ray_address: str | None = None
    ray_workers: int = 1
    ray_cpus_per_worker: float = 1.0
    ray_gpus_per_worker: float = 0.0
    log_interval: float = 30.0
    progress: bool = True
    #: hosts whose http(s) image URLs are fetched ("*": any public host); none: URLs are failures
    allow_image_hosts: tuple[str, ...] = ()


def fetch_policy(options: CorpusOptions) -> Any:
    from bgevl.api.images import FetchPolicy

    return FetchPolicy(hosts=frozenset(h.lower().strip() for h in options.allow_image_hosts))


def choose_kinds(source: Source, kinds: list[str], say: Any) -> list[str]:
    if kinds:
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            raise BgevlError(f"--kinds {','.join(kinds)}: {', '.join(unknown)} unknown; choose from {', '.join(KINDS)}")
        return list(dict.fromkeys(kinds))
    chosen: list[str] = [k.value for k in (IMAGE, TEXT) if k in source.available]
    if isinstance(source, FolderSource) and 0 < source.with_captions < source.count:
        say(f"{source.count - source.with_captions} of {source.count} images have no caption (.txt): embedding the "
            f"images only (captions kept in the metadata); --kinds image,text embeds captions too and lists the "
            f"images without one as failures")
    return chosen


def embed_corpus(options: CorpusOptions, say: Any = None) -> dict[str, Any]:
    """Embed ``options.input`` into ``options.output``; returns the summary (counts, output, engine)."""
    say = say or (lambda msg: print(msg, file=sys.stderr))
    if options.dtype not in DTYPES:
        raise BgevlError(f"--embedding-dtype {options.dtype}: choose one of {', '.join(DTYPES)}")
    if options.partition_size < 1 or (options.batch_size is not None and options.batch_size < 1) or options.workers < 1:
        raise BgevlError("--partition-size, --batch-size and --workers must be at least 1")
    from bgevl.core.manifest import read_manifest

    if "://" not in options.output:
        options.output = os.path.abspath(os.path.expanduser(options.output))
    manifest = read_manifest(options.export)  # refused in one line before the input is read
    ranges = EmbeddingRanges.load(Path(options.export)) if needs_ranges(options.dtype) else None
    if needs_ranges(options.dtype) and ranges is None:
        raise BgevlError(f"--embedding-dtype {options.dtype} needs the export's calibration ranges, and {options.export} "
                         f"has none: compute them once with 'bgevl-export ranges {options.export} --data DIR' (a sample "
                         f"of this corpus), so that queries and the corpus quantize alike")
    source = open_source(options.input, options.input_format, options.id_column, options.image_column, options.text_column)
    kinds = choose_kinds(source, options.kinds, say)
    need_image, need_text = needs(kinds)
    if need_image and IMAGE not in source.available:
        raise BgevlError(f"--kinds {','.join(kinds)} needs images and {options.input} holds none; use --kinds text")
    if need_text and TEXT not in source.available and not isinstance(source, FolderSource):
        raise BgevlError(f"--kinds {','.join(kinds)} needs texts and {options.input} holds none; use --kinds image")
    identity = {"model": manifest.model.key, "weights": manifest.model.weights, "checkpoint": manifest.model.source,
                "precision": manifest.precision, "int8_mode": manifest.int8_mode,
                "embedding_dim": manifest.embedding_dim, "kinds": kinds, "role": options.role,
                "instruction": options.instruction, "dtype": options.dtype, "partition_size": options.partition_size,
                "input": source.describe(), **({"ranges": ranges.fingerprint} if ranges is not None else {})}
    if options.ray_address and options.triton:
        raise BgevlError("--ray-address and --triton are two engines; choose one")
    engine = "ray" if options.ray_address else "triton" if options.triton else "local"
    info = {"export": {"directory": str(Path(options.export).resolve()), "model": manifest.model.key,
                       "family": manifest.family, "precision": manifest.precision,
                       "backend": f"triton {options.triton} ({options.triton_model})" if options.triton else options.backend,
                       "embedding_dim": manifest.embedding_dim, "created": manifest.created},
            "input": source.describe(), "engine": engine, "partition_size": options.partition_size}
    captions = TEXT in source.available or need_text or bool(getattr(source, "with_captions", 0))
    output = CorpusOutput(options.output, identity, info, kinds, captions=captions, images=need_image,
                          metadata_schema=source.metadata_schema, dtype=options.dtype, ranges=ranges)
    if output.done:
        say(f"resuming: {len(output.done)} partitions of {options.output} are complete and are kept")
    from bgevl.runtime import Embedder

    progress = ItemProgress(source.count, options.log_interval, enabled=options.progress)
    try:
        if engine == "ray":
            from bgevl.corpus.ray_engine import embed_ray

            embed_ray(source, output, options, kinds, progress)
        elif engine == "triton":
            from bgevl.corpus.triton_engine import TritonBatchEmbedder, TritonModel

            assert options.triton is not None  # the engine is "triton" because it is set
            model = TritonModel(manifest, options.triton, options.triton_model)
            progress.begin()
            embed_local(source, output, TritonBatchEmbedder(model, kinds, options.role, options.instruction, fetch_policy(options)),
                        options.partition_size, options.batch_size or model.max_batch, options.workers, progress)
        else:
            with Embedder.load(options.export, provider=options.provider, threads=options.threads,
                               backend=options.backend) as embedder:
                batch = options.batch_size or embedder.max_batch
                progress.begin()
                embed_local(source, output, BatchEmbedder(embedder, kinds, options.role, options.instruction,
                                                          fetch_policy(options)),
                            options.partition_size, batch, options.workers, progress)
    finally:
        progress.close()
    output.save(complete=True)
    counts = output.counts()
    return {"output": options.output, "engine": engine, "kinds": kinds, **counts, "skipped": progress.skipped,
            "embedded_now": progress.done - progress.failed, "failed_now": progress.failed,
            "seconds": round(time.monotonic() - progress.start, 3)}

