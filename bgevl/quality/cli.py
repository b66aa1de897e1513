"""``bgevl-eval``: retrieval quality of exports on your own data, against the fp32 export.

Examples::

    bgevl-eval --export out/base-fp32 --export out/base-int8 --data my-eval/
    bgevl-eval --export out/base-fp32 --export out/base-fp16 --backend onnxruntime --backend openvino \\
        --pairs coco-val.parquet --image-column image --text-column caption --json report.json
    bgevl-eval --export out/mllm-fp16 --triplets circo/val.json --gallery circo/unlabeled2017/ --max-recall-drop 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from bgevl.core.errors import BgevlError
from bgevl.core.interrupts import run_cli
from bgevl.corpus.cli import reader_options
from bgevl.quality.data import QualityData, load_data, read_pairs, read_triplets
from bgevl.quality.evaluate import I2T_INSTRUCTION, T2I_INSTRUCTION, EvalOptions, RunSpec, evaluate, markdown, worst_drop
from bgevl.quality.gate import DEFAULT_MAX_RECALL_DROP, gate_message
from bgevl.quality.metrics import BOOTSTRAP_RESAMPLES
from bgevl.runtime.runners import BACKENDS


def _ks(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated integers, e.g. 1,5,10") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bgevl-eval",
        description="Retrieval quality of exports on your own data, offline: text->image and image->text recall@k "
                    "on image-text pairs, composed recall@k and CIRCO mAP@k on CIRR/CIRCO-style triplets; each export "
                    "and backend against the reference (the fp32 export) on the same items, with bootstrap 95 %% "
                    "intervals of the differences and the top-10 overlap of the rankings.",
        epilog="Output: a Markdown report on stdout (--markdown FILE too), the full figures with --json FILE. Exit "
               "status 1 when --max-recall-drop is given and exceeded. See docs/quality.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r = p.add_argument_group("exports and backends")
    r.add_argument("--export", type=Path, action="append", required=True, metavar="DIR",
                   help="an export directory (bgevl-export --output); repeat for several. The first is the reference "
                        "unless --reference is given")
    r.add_argument("--reference", type=Path, default=None, metavar="DIR",
                   help="the reference export (normally the fp32 export of the same checkpoint)")
    r.add_argument("--backend", action="append", choices=BACKENDS, default=None,
                   help="evaluate every --export on this backend (Embedder.load); repeat for several "
                        "(default: onnxruntime)")
    r.add_argument("--reference-backend", choices=BACKENDS, default="onnxruntime", help="the reference's backend")
    r.add_argument("--provider", default="auto", help="ONNX Runtime: auto, cpu, cuda or tensorrt")
    r.add_argument("--threads", type=int, default=None, help="inference threads (default: the runtime's)")
    r.add_argument("--openvino-precision", default="bf16", choices=("bf16", "f32"),
                   help="OpenVINO inference precision (bf16 where the CPU has it)")
    d = p.add_argument_group("data (a --data directory, or --pairs and/or --triplets with --gallery)")
    d.add_argument("--data", type=Path, default=None, metavar="DIR",
                   help="pairs/ (or pairs.csv|jsonl|parquet, or pairs/*.tar) and/or triplets.json with gallery/")
    d.add_argument("--pairs", default=None, metavar="INPUT",
                   help="image-text pairs: a folder of images with <stem>.txt captions (one caption per line), a table "
                        "(.csv, .jsonl, .parquet; rows naming the same image are one image with several captions) or "
                        "WebDataset .tar shards; local or an fsspec URL")
    d.add_argument("--triplets", default=None, metavar="FILE",
                   help="composed-retrieval queries: a CIRR or CIRCO .json (reference image, modification text, target "
                        "image id or ids), or .jsonl")
    d.add_argument("--gallery", default=None, metavar="INPUT",
                   help="the images the triplets' ids name (folder, table or shards); ids match item ids, file names "
                        "without extension, or the same number (CIRCO's COCO ids)")
    reader_options(d, "of --pairs (auto: from the path)")
    q = p.add_argument_group("queries (families whose queries take a role and instruction)")
    q.add_argument("--instruction", default=None,
                   help="composed queries' task instruction (default: the export's, BGE-VL's composed-retrieval one)")
    q.add_argument("--t2i-instruction", default=None, help=f"text->image queries' (default: {T2I_INSTRUCTION!r}, MMEB's)")
    q.add_argument("--i2t-instruction", default=None, help=f"image->text queries' (default: {I2T_INSTRUCTION!r}, MMEB's)")
    m = p.add_argument_group("metrics and report")
    m.add_argument("--recall-k", type=_ks, default=(1, 5, 10), help="recall@k cut-offs")
    m.add_argument("--map-k", type=_ks, default=(5, 10, 25, 50), help="composed mAP@k cut-offs (CIRCO's)")
    m.add_argument("--embedding-dtype", type=lambda t: tuple(v for v in t.split(",") if v), default=(),
                   metavar="TYPES", help="also measure the reference's retrieval in these compact types (int8, uint8, "
                                         "binary, ubinary; comma-separated): a first pass over the whole gallery in that "
                                         "type, and with its top k x --rescore-multiplier rescored in float32 "
                                         "(int8/uint8 with the export's ranges: bgevl-export ranges)")
    m.add_argument("--rescore-multiplier", type=int, default=4, help="candidates rescored per result, as a multiple of k")
    m.add_argument("--bootstrap", type=int, default=BOOTSTRAP_RESAMPLES, help="bootstrap resamples of the queries")
    m.add_argument("--seed", type=int, default=0, help="bootstrap seed (the intervals are the same on every run)")
    m.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the full report as JSON")
    m.add_argument("--markdown", type=Path, default=None, metavar="FILE", help="write the Markdown report")
    m.add_argument("--html", type=Path, default=None, metavar="FILE",
                   help="write a page to look at: the metric tables, and per run the queries whose top k changed most "
                        "against the reference, with both ranked rows of thumbnails (one self-contained file)")
    m.add_argument("--examples", type=int, default=5, help="queries shown per run and task in the HTML page")
    m.add_argument("--max-recall-drop", type=float, default=None, metavar="POINTS",
                   help=f"exit 1 when a recall@k or mAP@k of any run is this many points under the reference's "
                        f"(bgevl-export's gate uses {DEFAULT_MAX_RECALL_DROP})")
    o = p.add_argument_group("progress")
    o.add_argument("--workers", type=int, default=2, help="threads reading, decoding and preprocessing ahead of the model")
    o.add_argument("--log-interval", type=float, default=30.0, help="seconds between progress lines when not on a terminal")
    o.add_argument("--quiet", "-q", action="store_true", help="no progress, only the report and errors")
    return p


def read_data(args: argparse.Namespace) -> QualityData:
    """The data the arguments name, refused in one line when missing or malformed."""
    if args.data is not None:
        if args.pairs or args.triplets or args.gallery:
            raise BgevlError("--data DIR or --pairs/--triplets/--gallery: choose one way to give the data")
        return load_data(args.data)
    if args.pairs is None and args.triplets is None:
        raise BgevlError("no data: give --data DIR, --pairs INPUT, or --triplets FILE with --gallery INPUT")
    if (args.triplets is None) != (args.gallery is None):
        raise BgevlError("--triplets and --gallery go together: the gallery holds the triplets' images")
    data = QualityData(location=", ".join(x for x in (args.pairs, args.triplets) if x))
    if args.pairs is not None:
        data.pairs = read_pairs(args.pairs, args.input_format, args.id_column, args.image_column, args.text_column)
    if args.triplets is not None:
        data.triplets = read_triplets(args.triplets, args.gallery, "auto", args.id_column, args.image_column,
                                      args.text_column)
    return data


def write_atomic(path: Path, text: str) -> None:
    """``path`` complete or not at all: a temporary file beside it, renamed over it."""
    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise BgevlError(f"cannot write {path}: {exc.strerror or exc}; choose a writable path") from None


def runs_of(args: argparse.Namespace) -> list[RunSpec]:
    backends = args.backend or ["onnxruntime"]
    common = dict(provider=args.provider, threads=args.threads, openvino_precision=args.openvino_precision)
    reference = RunSpec(args.reference or args.export[0], args.reference_backend, **common)
    runs = [reference]
    for export in args.export:
        for backend in backends:
            same = Path(export).resolve() == Path(reference.export).resolve() and backend == reference.backend
            if not same:
                runs.append(RunSpec(export, backend, **common))
    return runs


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = EvalOptions(recall_k=args.recall_k, map_k=args.map_k, resamples=args.bootstrap, seed=args.seed,
                          instruction=args.instruction, t2i_instruction=args.t2i_instruction,
                          i2t_instruction=args.i2t_instruction, workers=args.workers, progress=not args.quiet,
                          log_interval=args.log_interval, embedding_dtypes=args.embedding_dtype,
                          rescore_multiplier=args.rescore_multiplier, examples=args.examples)
    return run_cli("bgevl-eval", lambda: _evaluate(args, options), "interrupted; no report was written")


def _evaluate(args: argparse.Namespace, options: EvalOptions) -> int:
    say = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    options.check()
    if args.max_recall_drop is not None and args.max_recall_drop < 0:
        raise BgevlError(f"--max-recall-drop {args.max_recall_drop:g}: give a drop in points, 0 or more")
    from bgevl.core.manifest import read_manifest

    for run in {r.export for r in runs_of(args)}:  # every export readable before the data is read
        read_manifest(run)
    data = read_data(args)
    report = evaluate(data, runs_of(args), options, say=say)
    text = markdown(report)
    if args.json is not None:
        write_atomic(args.json, json.dumps(report, indent=1) + "\n")
    if args.markdown is not None:
        write_atomic(args.markdown, text)
    if args.html is not None:
        from bgevl.corpus.readers import read_bytes, url_to_fs
        from bgevl.quality.html import html_report

        def read(uri: str) -> bytes:
            fs, path = url_to_fs(uri)
            return read_bytes(fs, path)

        write_atomic(args.html, html_report(report, data, read))
    print(text, end="")
    worst = worst_drop(report)
    if args.max_recall_drop is not None and worst is not None and -worst["delta"] > args.max_recall_drop:
        print(f"bgevl-eval: quality gate: {gate_message(worst, args.max_recall_drop, report['reference'])}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
