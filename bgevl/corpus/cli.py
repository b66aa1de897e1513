"""``bgevl-embed``: embed a corpus (folder of images, text file, table, WebDataset shards) into clip-retrieval's layout.

Examples::

    bgevl-embed --export out/large-fp16 --input photos/ --output emb/photos
    bgevl-embed --export out/large-fp16 --input 's3://bucket/shards/{00000..00099}.tar' --output s3://bucket/emb \\
        --ray-address auto --ray-workers 8 --ray-gpus-per-worker 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bgevl.core.interrupts import run_cli
from bgevl.corpus.job import DEFAULT_PARTITION_SIZE, DTYPES, CorpusOptions, embed_corpus
from bgevl.corpus.readers import INPUT_FORMATS
from bgevl.core.family import KINDS
from bgevl.runtime.runners import BACKENDS


def reader_options(group: Any, format_help: str) -> None:
    """The readers' options (``bgevl.corpus.readers.open_source``), shared by the commands that read inputs."""
    group.add_argument("--input-format", default="auto", choices=INPUT_FORMATS, help=format_help)
    group.add_argument("--id-column", default="id", help="table: the unique id of each row")
    group.add_argument("--image-column", default="image",
                       help="table: image path (relative to the table's folder), URI or bytes")
    group.add_argument("--text-column", default="text", help="table: caption or text")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bgevl-embed", description="Embed a corpus (a folder of images, a text file, a table, "
                                "WebDataset shards) with an export, into clip-retrieval's layout; on one machine, on Ray "
                                "Data or through a Triton server.",
                                epilog="Output: img_emb/, text_emb/, composed_emb/ (.npy per partition), metadata/ "
                                       "(Parquet, same rows), embeddings/ (Parquet id, embedding), failures/ (id, source, "
                                       "reason), manifest.json. Running the same command again resumes; see docs/corpus.md.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io_ = p.add_argument_group("input and output")
    io_.add_argument("--export", type=Path, required=True, help="export directory (bgevl-export --output), holding manifest.json")
    io_.add_argument("--input", "-i", required=True,
                     help="a folder of images (recursive; <name>.txt beside an image is its caption), a text file (one "
                          "text per line), a table (.csv, .jsonl, .parquet) or WebDataset .tar shards (a folder of them, "
                          "a file, a glob or {00000..00099}.tar); local or an fsspec URL (s3://, gs://, ...)")
    io_.add_argument("--output", "-o", required=True, help="output folder, local or an fsspec URL; an existing output of the "
                                                          "same job is resumed, one of another model/precision refused")
    reader_options(io_, "auto: from the path")
    io_.add_argument("--allow-image-host", action="append", default=[], metavar="HOST",
                     help="fetch a table's http(s) image URLs from this host (repeatable; host:port for another port; "
                          "'*': any host; a name must resolve to public addresses, name a private address itself); "
                          "none: such URLs are failures")
    e = p.add_argument_group("embedding")
    e.add_argument("--kinds", default="auto",
                   help=f"comma-separated of {', '.join(KINDS)} (composed: the image and text of an item as one query); "
                        "auto: image and/or text, as the input holds them")
    e.add_argument("--role", default=None, help="query or candidate (families where roles matter: default candidate unless "
                                                 "--instruction is given; others: no effect)")
    e.add_argument("--instruction", default=None, help="task instruction of queries (families where roles matter)")
    e.add_argument("--embedding-dtype", "--dtype", dest="dtype", default="float32", choices=DTYPES,
                   help="of the stored vectors: float16 (what clip-retrieval stores), int8/uint8 (with the export's "
                        "calibration ranges: bgevl-export ranges), binary/ubinary (sign bits, 8 per byte)")
    e.add_argument("--partition-size", type=int, default=DEFAULT_PARTITION_SIZE,
                   help="items per partition: the unit of output files and of resuming")
    r = p.add_argument_group("runtime (one machine)")
    r.add_argument("--backend", default="onnxruntime", choices=BACKENDS)
    r.add_argument("--provider", default="auto", help="ONNX Runtime: auto, cpu, cuda or tensorrt")
    r.add_argument("--threads", type=int, default=None, help="inference threads (default: the runtime's)")
    r.add_argument("--batch-size", type=int, default=None, help="items per model call (default: the export's max batch)")
    r.add_argument("--workers", type=int, default=4, help="threads reading, decoding and preprocessing batches ahead of the model")
    d = p.add_argument_group("many machines (Ray Data; the 'ray' extra)")
    d.add_argument("--ray-address", default=None,
                   help="run on Ray Data: 'auto' (a running cluster), 'ray://HOST:10001', or 'local' (start Ray here)")
    d.add_argument("--ray-workers", type=int, default=1, help="actors, each holding one Embedder")
    d.add_argument("--ray-cpus-per-worker", type=float, default=1.0)
    d.add_argument("--ray-gpus-per-worker", type=float, default=0.0, help="1 for one actor per GPU")
    t = p.add_argument_group("a Triton server as the engine (the 'serving' extra)")
    t.add_argument("--triton", default=None, metavar="URL",
                   help="HTTP endpoint of a bgevl-serve (Triton) repository written from --export, e.g. 127.0.0.1:8000; "
                        "items are read and checked here, embedded there")
    t.add_argument("--triton-model", default="bgevl", help="the repository's entry model")
    o = p.add_argument_group("progress")
    o.add_argument("--log-interval", type=float, default=30.0, help="seconds between progress lines when not on a terminal")
    o.add_argument("--quiet", "-q", action="store_true", help="no progress, only the summary and errors")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    kinds = [] if args.kinds == "auto" else [k.strip() for k in args.kinds.split(",") if k.strip()]
    options = CorpusOptions(
        export=args.export, input=args.input, output=args.output, input_format=args.input_format,
        id_column=args.id_column, image_column=args.image_column, text_column=args.text_column, kinds=kinds,
        role=args.role, instruction=args.instruction, dtype=args.dtype, partition_size=args.partition_size,
        batch_size=args.batch_size, workers=args.workers, backend=args.backend, provider=args.provider,
        threads=args.threads, triton=args.triton, triton_model=args.triton_model, ray_address=args.ray_address, ray_workers=args.ray_workers,
        ray_cpus_per_worker=args.ray_cpus_per_worker, ray_gpus_per_worker=args.ray_gpus_per_worker,
        log_interval=args.log_interval, progress=not args.quiet, allow_image_hosts=tuple(args.allow_image_host))
    kept = f"complete partitions are kept in {args.output}: run the same command to resume"
    return run_cli("bgevl-embed", lambda: _embed(options), f"interrupted; {kept}",
                   os_errors=f"{kept} once there is room or it is writable")  # a full or read-only output


def _embed(options: CorpusOptions) -> int:
    summary = embed_corpus(options)
    print(f"embedded {summary['embedded']} items ({summary['embedded_now']} now), failed {summary['failed']} "
          f"(listed in {options.output}/failures), skipped {summary['skipped']} already in {options.output}; "
          f"{summary['partitions']} partitions, kinds {','.join(summary['kinds'])}, {summary['seconds']:.1f} s")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
