"""``manifest.json``: what an export directory holds, read by the runtime, Triton packaging and benchmarks.

Written once by the exporter. For every graph: file, inputs/outputs (name, dtype, shape with
named dynamic axes and their ranges), precision, opset, source checkpoint and the validation
figures against the PyTorch reference.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bgevl.errors import BgevlError
from bgevl.specs import GraphSpec

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Manifest:
    directory: Path
    data: dict[str, Any]

    @property
    def family(self) -> str:
        return self.data["model"]["family"]

    @property
    def precision(self) -> str:
        return self.data["precision"]

    @property
    def embedding_dim(self) -> int:
        return int(self.data["model"]["embedding_dim"])

    @property
    def max_text_length(self) -> int:
        return int(self.data["model"]["max_text_length"])

    @property
    def processor_dir(self) -> Path:
        return self.directory / self.data["processor_dir"]

    def graph_names(self) -> list[str]:
        return list(self.data["graphs"])

    def graph_spec(self, name: str) -> GraphSpec:
        return GraphSpec.from_json(self.data["graphs"][name])

    def graph_path(self, name: str) -> Path:
        return self.directory / self.data["graphs"][name]["file"]

    def engine(self, name: str) -> dict[str, Any]:
        """The TensorRT engine entry of graph ``name`` (``engines`` section, written by the engine build)."""
        engines = self.data.get("engines") or {}
        if name not in engines:
            raise BgevlError(f"{self.directory} has no TensorRT engine for graph {name!r}; build the engines with "
                             f"`bgevl-export build-engines {self.directory}` on a machine with TensorRT and a GPU")
        return engines[name]

    def path_of(self, relative: str) -> Path:
        return self.directory / relative

    def graph_files(self, name: str) -> list[Path]:
        """The graph file and, for graphs over 2 GB, its external-data file ``<file>.data``."""
        path = self.graph_path(name)
        data = path.with_name(path.name + ".data")
        return [path] + ([data] if data.exists() else [])


def write_manifest(directory: Path, data: dict[str, Any]) -> Path:
    """Write ``manifest.json`` atomically (a temporary file renamed over it), so a reader or a crash
    never sees half a manifest; updates of a finished export (the engines section) rely on it."""
    path = Path(directory) / MANIFEST_NAME
    partial = path.with_name(f".{MANIFEST_NAME}.partial")
    partial.write_text(json.dumps({"format_version": FORMAT_VERSION, **data}, indent=2, default=str) + "\n")
    os.replace(partial, path)
    return path


def read_manifest(directory: str | Path) -> Manifest:
    directory = Path(directory).expanduser()
    path = directory / MANIFEST_NAME
    if not path.is_file():
        hint = "run `bgevl-export --model tiny --output DIR` (or base/large) first" if not directory.exists() else \
            "this directory is not a bgevl-export output; export into it with `bgevl-export --output DIR`"
        raise BgevlError(f"no {MANIFEST_NAME} in {directory}: {hint}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BgevlError(f"{path} is not valid JSON ({exc}); re-run the export") from exc
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise BgevlError(f"{path} has format_version {version}, this bgevl reads {FORMAT_VERSION}; re-run the export")
    for name, graph in data.get("graphs", {}).items():
        if not (directory / graph["file"]).is_file():
            raise BgevlError(f"{path} lists graph {name!r} as {graph['file']}, which is missing; re-run the export")
    return Manifest(directory, data)
