"""``bgevl-bench corpus``: corpus embedding end to end next to ``Embedder.encode``, on one export and backend.

    bgevl-bench corpus --items 10000 --output benchmarks/results/cpu-corpus

Side by side in one run, on one generated corpus of JPEG images (``bgevl.corpus.synthetic``) written
to disk as a folder:

* ``encode``: ``Embedder.encode(images=bytes)`` batch after batch on the files' bytes already in
  memory (decode and preprocessing inside the call, no I/O): the runtime's own speed;
* ``local``: ``bgevl-embed`` from the files on disk (a child process), images only, at the same batch
  size: reading, decoding and preprocessing in its worker threads, the output written; its peak
  resident memory is the child's own (``wait4``'s ``ru_maxrss``);
* ``ray``: the same command with ``--ray-address local`` (a Ray instance started by the child) and
  ``--ray-workers`` actors: its figure includes starting Ray and its actors.

Items/s of each, ratios to ``encode`` and ``local``, written to ``report.md`` and ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bgevl.core.errors import BgevlError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bgevl-bench corpus", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--export", type=Path, default=None, help="export directory (default: the tiny model at fp32, exported "
                                                              "into --workdir)")
    p.add_argument("--items", type=int, default=10_000, help="images in the generated corpus")
    p.add_argument("--image-size", type=int, default=160, help="side of the generated JPEG images, pixels")
    p.add_argument("--batch-size", type=int, default=None, help="default: the export's max batch")
    p.add_argument("--workers", type=int, default=4, help="bgevl-embed's decode threads")
    p.add_argument("--ray-workers", type=int, default=2, help="0: no Ray measurement")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--workdir", type=Path, default=Path("out/bench-corpus"), help="corpus, export and outputs")
    p.add_argument("--output", type=Path, default=Path("benchmarks/results/cpu-corpus"))
    return p


def _child(command: list[str]) -> dict[str, Any]:
    """Run a bgevl-embed child; its summary, wall time and own peak RSS."""
    start = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - start
    assert proc.stdout is not None and proc.stderr is not None  # PIPE
    out, err = proc.stdout.read(), proc.stderr.read()
    if proc.returncode != 0:
        raise BgevlError(f"{shlex.join(command)} failed ({proc.returncode}): {err.strip().splitlines()[-1:]}")
    summary = json.loads(out.strip().splitlines()[-1])
    return {"summary": summary, "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}


def _cpu() -> dict[str, Any]:
    info = {"machine": platform.machine(), "cores": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "Flags"):
                info[key.strip().lower().replace(" ", "_")] = value.strip()
    except OSError:
        pass
    return info


def run(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from bgevl.corpus.synthetic import make_items, write_folder
    from bgevl.runtime import Embedder

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    export = args.export
    if export is None:
        export = work / "tiny-fp32"
        if not (export / "manifest.json").exists():
            from bgevl.export import ExportOptions, run_export

            run_export(ExportOptions(output=export, model="tiny", precision="fp32"), sink=lambda msg: None)
    folder = work / f"images-{args.items}-{args.image_size}"
    if not folder.exists():
        print(f"writing {args.items} images of {args.image_size} px to {folder}", file=sys.stderr)
        partial = folder.with_name(folder.name + ".partial")
        write_folder(partial, make_items(args.items, size=args.image_size), subfolders=16)
        partial.rename(folder)
    files = sorted(folder.rglob("*.jpg"))
    embedder = Embedder.load(export, backend=args.backend)
    batch = args.batch_size or embedder.max_batch
    data = [f.read_bytes() for f in files]  # the bytes already loaded: no I/O in this measurement
    embedder.encode(images=data[:batch])  # warm-up
    print(f"Embedder.encode on {len(data)} loaded images, batch {batch}", file=sys.stderr)
    start = time.monotonic()
    for i in range(0, len(data), batch):
        embedder.encode(images=data[i:i + batch])
    encode_s = time.monotonic() - start
    del data, embedder
    base = [sys.executable, "-m", "bgevl.corpus.cli", "--export", str(export), "--input", str(folder), "--kinds", "image",
            "--batch-size", str(batch), "--backend", args.backend, "--quiet"]
    results: dict[str, Any] = {"encode": {"items_per_s": len(files) / encode_s, "seconds": encode_s}}
    runs = [("local", ["--workers", str(args.workers)])]
    if args.ray_workers:
        runs.append(("ray", ["--ray-address", "local", "--ray-workers", str(args.ray_workers)]))
    for name, extra in runs:
        out = work / f"out-{name}"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        print(f"bgevl-embed {name}", file=sys.stderr)
        child = _child(base + ["--output", str(out)] + extra)
        seconds = child["summary"]["seconds"]
        results[name] = {"items_per_s": child["summary"]["embedded"] / seconds, "seconds": seconds,
                         "wall_s": child["wall_s"], "peak_rss_mb": child["peak_rss_mb"],
                         "embedded": child["summary"]["embedded"], "failed": child["summary"]["failed"]}
    same = None
    if "ray" in results:
        a = np.concatenate([np.load(p) for p in sorted((work / "out-local" / "img_emb").glob("*.npy"))])
        b = np.concatenate([np.load(p) for p in sorted((work / "out-ray" / "img_emb").glob("*.npy"))])
        same = float(np.abs(a - b).max())
    return {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": shlex.join(["bgevl-bench", "corpus", *sys.argv[2:]]),
            "cpu": _cpu(), "export": str(export), "backend": args.backend, "items": len(files), "image_size": args.image_size,
            "batch": batch, "workers": args.workers, "ray_workers": args.ray_workers, "results": results,
            "local_over_encode": results["local"]["items_per_s"] / results["encode"]["items_per_s"],
            "ray_over_local": results["ray"]["items_per_s"] / results["local"]["items_per_s"] if "ray" in results else None,
            "ray_vs_local_max_abs_diff": same}


def report(data: dict[str, Any]) -> str:
    r = data["results"]
    lines = [f"# Corpus embedding: bgevl-embed next to Embedder.encode ({data['created']})", "",
             f"CPU: {data['cpu'].get('model_name', '?')}, {data['cpu']['cores']} cores (shared with other jobs while measured). "
             f"Export `{data['export']}`, backend {data['backend']}, batch {data['batch']}, {data['items']} JPEG images of "
             f"{data['image_size']} px generated on disk, image embeddings only. Command: `{data['command']}`.", "",
             "| engine | items/s | seconds | peak RSS (MB) | note |", "| --- | ---: | ---: | ---: | --- |",
             f"| Embedder.encode on loaded bytes | {r['encode']['items_per_s']:.1f} | {r['encode']['seconds']:.1f} | | no I/O; decode inside the call |"]
    for name, note in (("local", f"bgevl-embed from files, {data['workers']} decode threads"),
                       ("ray", f"bgevl-embed --ray-address local, {data['ray_workers']} actors (includes Ray start)")):
        if name in r:
            lines.append(f"| {name} | {r[name]['items_per_s']:.1f} | {r[name]['seconds']:.1f} | {r[name]['peak_rss_mb']:.0f} | "
                         f"{note}; child wall {r[name]['wall_s']:.1f} s |")
    lines += ["", f"* local / encode: **{data['local_over_encode']:.2f}**"]
    if data["ray_over_local"] is not None:
        lines.append(f"* ray / local: **{data['ray_over_local']:.2f}** (max |diff| of the vectors: {data['ray_vs_local_max_abs_diff']:.2g})")
    lines.append(f"* CPU flags: {data['cpu'].get('flags', '?')}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from bgevl.core.interrupts import run_cli

    args = build_parser().parse_args(argv)
    return run_cli("bgevl-bench corpus", lambda: _measure(args))


def _measure(args: argparse.Namespace) -> int:
    data = run(args)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    (args.output / "report.md").write_text(report(data))
    print(report(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
