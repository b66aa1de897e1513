"""perf_analyzer, the load generator Triton users measure with: installing it, its input data, running it.

* **The binary**: of the tritonclient wheels only 2.51.0's ``perf_analyzer`` runs on this OS
  (2.52-2.60 need GLIBC 2.38, 2.61 and later ship none). :func:`install` puts that wheel, without its
  Python dependencies, into ``<venv>/tools/perf_analyzer`` and links the two libraries it needs,
  ``libb64.so.0d`` and ``libcudart.so.12``, to the copies the nvidia-pytriton wheel ships under
  other names. ``python -m bgevl.serving.perf_analyzer --install`` (``scripts/setup-env.sh``
  runs it) does that.
* **Input data**: every generated repository holds ``perf_analyzer_<workload>.json`` files for its
  entry model (:func:`input_data`): random data does not work here (IMAGE would get 128 random bytes),
  and BYTES images must be written as base64 of a 4-byte little-endian length followed by the file.
* **Running**: :func:`run` drives a concurrency sweep and reads perf_analyzer's CSV (p50/p90/p99 and
  throughput); ``bgevl-bench`` uses it for its Triton sweep where the binary runs.
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bgevl.core.errors import BgevlError

VERSION = "2.51.0"
TOOLS_DIR = Path(sys.prefix) / "tools" / "perf_analyzer"
#: The libraries perf_analyzer links and the names of the nvidia-pytriton wheel's copies.
LIBRARIES = {"libb64.so.0d": "libb64-*.so.0d", "libcudart.so.12": "libcudart-*.so.12*"}

#: Items per input-data file (perf_analyzer cycles through them).
ITEMS = 4


def _pytriton_libs() -> Path:
    try:
        import pytriton
    except ImportError:
        raise BgevlError("perf_analyzer's libraries come from the nvidia-pytriton wheel: pip install 'bgevl-export[serving]'") from None
    return Path(pytriton.__file__).resolve().parent.parent / "nvidia_pytriton.libs"


def install(tools: Path = TOOLS_DIR) -> Path:
    """Install perf_analyzer 2.51.0 into ``tools`` (bin/ and lib/); returns the binary."""
    tools = Path(tools)
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade", "--target",
                             str(tools), "--only-binary=:all:", "--platform", "manylinux1_x86_64",
                             f"tritonclient=={VERSION}"], capture_output=True, text=True)
    binary = tools / "bin" / "perf_analyzer"
    if result.returncode != 0 or not binary.is_file():
        raise BgevlError(f"installing tritonclient=={VERSION} (for its perf_analyzer) failed: "
                         f"{(result.stderr.strip().splitlines() or ['no binary in the wheel'])[-1]}")
    lib = tools / "lib"
    lib.mkdir(exist_ok=True)
    libs = _pytriton_libs()
    for name, pattern in LIBRARIES.items():
        found = sorted(libs.glob(pattern))
        if not found:
            raise BgevlError(f"{libs} has no {pattern}; perf_analyzer needs it as {name}")
        link = lib / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(found[0])
    return binary


def find(tools: Path = TOOLS_DIR) -> tuple[Path | None, str]:
    """(binary, "") when perf_analyzer runs here, else (None, the reason)."""
    binary = Path(tools) / "bin" / "perf_analyzer"
    if not binary.is_file():
        return None, (f"perf_analyzer is not installed ({binary} missing); run "
                      f"`{Path(sys.executable).name} -m bgevl.serving.perf_analyzer --install`")
    try:
        result = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30, env=environment(tools))
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"perf_analyzer does not start: {exc}"
    if f"Version {VERSION}" not in result.stdout + result.stderr:  # it prints its version, whatever its exit code
        return None, f"perf_analyzer does not run on this OS: {(result.stderr or result.stdout).strip()[:300]}"
    return binary, ""


def environment(tools: Path = TOOLS_DIR) -> dict[str, str]:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(Path(tools) / "lib"), env.get("LD_LIBRARY_PATH", "")) if p)
    return env


# --- input data ---------------------------------------------------------------------------------

def bytes_tensor(values: list[bytes]) -> dict[str, Any]:
    """A BYTES tensor as perf_analyzer's ``b64``: Triton's serialization (per element a 4-byte
    little-endian length, then the bytes), base64-encoded."""
    raw = b"".join(struct.pack("<I", len(v)) + v for v in values)
    return {"b64": base64.b64encode(raw).decode("ascii"), "shape": [len(values)]}


def _images() -> list[bytes]:
    from bgevl.core.probes import synthetic_images

    out = []
    for image in synthetic_images(ITEMS, seed=11):
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def request_values(request) -> dict[str, list[bytes]]:
    """The entry model's BYTES inputs of a request (``bgevl.core.family.Request``), one value per item:
    IMAGE, TEXT and, where set, INSTRUCTION and ROLE (the same for every item of a request)."""
    from bgevl.core.specs import SERVING_IMAGE, SERVING_INSTRUCTION, SERVING_ROLE, SERVING_TEXT

    values: dict[str, list[bytes]] = {}
    if request.images is not None:
        values[SERVING_IMAGE] = [bytes(v) for v in request.images]
    if request.texts is not None:
        values[SERVING_TEXT] = [t.encode() for t in request.texts]
    for name, value in ((SERVING_INSTRUCTION, request.instruction), (SERVING_ROLE, request.role)):
        if value is not None:
            values[name] = [value.encode()] * len(request)
    return values


def input_data(family) -> dict[str, dict]:
    """{workload: perf_analyzer input-data document} for the entry model of a repository of ``family``
    (``Family.serving_workloads``). Each request is one item ([1] per input: the batch axis is
    perf_analyzer's ``-b``)."""
    from bgevl.core.probes import PROBE_TEXTS

    images, texts = _images(), list(PROBE_TEXTS[:ITEMS])
    documents = {}
    for workload, request in family.serving_workloads(images, texts).items():
        values = request_values(request)
        documents[workload] = {"data": [{name: bytes_tensor([v[i]]) for name, v in values.items()} for i in range(ITEMS)]}
    return documents


def write_input_data(repository: Path, family) -> list[Path]:
    out = []
    for workload, document in input_data(family).items():
        path = Path(repository) / f"perf_analyzer_{workload}.json"
        path.write_text(json.dumps(document))
        out.append(path)
    return out


# --- running ------------------------------------------------------------------------------------

def command(binary: Path, model: str, url: str, data: Path, concurrency: int, csv_path: Path,
            measurement_ms: int = 2000, protocol: str = "grpc", stability_percentage: float = 50) -> list[str]:
    return [str(binary), "-m", model, "-u", url, "-i", protocol, "--input-data", str(data),
            "--concurrency-range", f"{concurrency}:{concurrency}", "--measurement-interval", str(measurement_ms),
            "--stability-percentage", f"{stability_percentage:g}", "--max-trials", "6", "-f", str(csv_path)]


def run(model: str, url: str, data: Path, concurrency: list[int], measurement_ms: int = 2000,
        protocol: str = "grpc", binary: Path | None = None, stability_percentage: float = 50) -> list[dict[str, float]]:
    """One perf_analyzer run per concurrency level; rows with concurrency, requests/s, p50/p90/p99 (ms)
    and the server's queue and compute time per request (ms), from its CSV. ``stability_percentage``: how far
    apart perf_analyzer's last three measurement windows may be (it fails after ``--max-trials`` windows
    otherwise: on a busy machine, a check that the input data runs passes a large value)."""
    if binary is None:
        binary, why = find()
        if binary is None:
            raise BgevlError(why)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bgevl-perf-") as work:
        for level in concurrency:
            csv_path = Path(work) / f"c{level}.csv"
            cmd = command(binary, model, url, data, level, csv_path, measurement_ms, protocol, stability_percentage)
            try:
                result = subprocess.run(cmd, capture_output=True, text=True, env=environment(binary.parent.parent),
                                        timeout=600)
            except subprocess.TimeoutExpired:
                raise BgevlError(f"perf_analyzer did not finish within 10 minutes on {model} at concurrency {level}; "
                                 f"is the server answering?") from None
            if result.returncode != 0 or not csv_path.is_file():
                raise BgevlError(f"perf_analyzer failed on {model} at concurrency {level}: "
                                 f"{(result.stderr or result.stdout).strip()[-500:]}")
            rows += parse_csv(csv_path.read_text())
    return rows


def parse_csv(text: str) -> list[dict[str, float]]:
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        us = {k: float(v) for k, v in row.items() if k and v not in (None, "")}
        rows.append({
            "concurrency": int(us["Concurrency"]), "requests_per_s": us["Inferences/Second"],
            "p50_ms": us["p50 latency"] / 1e3, "p90_ms": us["p90 latency"] / 1e3, "p99_ms": us["p99 latency"] / 1e3,
            "server_queue_ms": us.get("Server Queue", 0.0) / 1e3,
            "server_compute_ms": sum(us.get(k, 0.0) for k in ("Server Compute Input", "Server Compute Infer",
                                                               "Server Compute Output")) / 1e3,
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bgevl.serving.perf_analyzer",
                                description=f"Install perf_analyzer {VERSION} into {TOOLS_DIR} or say whether it runs.")
    p.add_argument("--install", action="store_true", help="install it (needs the package index)")
    args = p.parse_args(argv)
    try:
        if args.install:
            install()
    except BgevlError as exc:
        print(f"perf_analyzer: not installed: {exc}", file=sys.stderr)
        return 2
    binary, why = find()
    print(f"perf_analyzer: {binary}" if binary else f"perf_analyzer: unavailable: {why}")
    return 0 if binary else 2


if __name__ == "__main__":
    sys.exit(main())
