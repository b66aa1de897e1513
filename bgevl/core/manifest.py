"""``manifest.json``: what an export directory holds, read by the runtime, TensorRT, Triton packaging and benchmarks.

Written by the export driver as a typed :class:`Manifest` and read back into one; every part
reads its fields, never raw keys. For every graph: its declaration (inputs/outputs with named
dynamic axes and their ranges), file, precision and what the precision pass did. One
:class:`Validation` layout serves every family and the TensorRT engines: the figures per kind of
item (``image``, ``text``, ``composed``) against the original's fp32 embeddings. The family's own
settings (score-fusion formula, image layout, default instruction, ...) are its ``recipe`` section.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from bgevl.core.errors import BgevlError
from bgevl.core.specs import GraphSpec

MANIFEST_NAME = "manifest.json"
#: 2: one validation layout for every family (``validation.figures`` by kind), the family settings in ``recipe``.
FORMAT_VERSION = 2


@dataclass
class ModelInfo:
    key: str
    family: str
    description: str
    source: str  # human-readable origin of the checkpoint
    weights: str  # "pretrained" or "random"
    embedding_dim: int
    max_text_length: int  # tokens (CLIP) or prompt plus image tokens (MLLM) the graphs serve
    parameters: int = 0
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class GraphEntry:
    spec: GraphSpec
    precision: str
    opset: int
    bytes: int
    precision_details: dict[str, Any] = field(default_factory=dict)

    @property
    def file(self) -> str:
        return self.spec.filename

    def to_json(self) -> dict[str, Any]:
        return {**self.spec.to_json(), "precision": self.precision, "opset": self.opset, "bytes": self.bytes,
                "precision_details": self.precision_details}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "GraphEntry":
        return cls(GraphSpec.from_json(data), data["precision"], int(data["opset"]), int(data["bytes"]),
                   data.get("precision_details") or {})


@dataclass
class Validation:
    """Parity against the original's fp32 embeddings: the same layout for ONNX exports and TensorRT engines."""

    performed: bool = False
    reference: str | None = None
    runtime: str | None = None
    probe_set: dict[str, Any] | None = None
    arrays: str | None = None
    threshold_min_cosine: float | None = None
    passed: bool | None = None
    weights: str | None = None
    note: str | None = None
    #: kind of item (image, text, composed) -> min/mean cosine, max |diff|, top-1 agreement, probe-max cosine, n
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        if not self.performed:
            return {"performed": False}
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> "Validation":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in known})


@dataclass
class EngineEntry:
    file: str
    sidecar: str
    tensorrt_version: str
    gpu: str
    compute_capability: str
    profiles: dict[str, Any]
    precision_plan: str


@dataclass(frozen=True)
class PipelineStep:
    """One step of the pipeline that wrote the export (``bgevl-export``'s numbered steps): its name,
    how it ended (``done``, ``skipped``) and how long it took."""

    name: str
    status: str
    seconds: float


@dataclass
class Manifest:
    directory: Path
    created: str
    model: ModelInfo
    precision: str
    int8_mode: str | None
    calibration: dict[str, Any] | None
    opset: int
    processor: str  # processor files, relative to the directory
    graphs: dict[str, GraphEntry]
    recipe: dict[str, Any]
    validation: Validation
    versions: dict[str, str]
    command: str | None = None
    engines: dict[str, EngineEntry] = field(default_factory=dict)
    engine_validation: Validation = field(default_factory=Validation)
    #: retrieval quality against the fp32 graphs on the user's data (``bgevl-export --quality-data``)
    quality: dict[str, Any] | None = None
    #: the export's steps with their status and timings, in order
    pipeline: list[PipelineStep] = field(default_factory=list)

    # --- reading --------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.model.family

    @property
    def embedding_dim(self) -> int:
        return self.model.embedding_dim

    @property
    def max_text_length(self) -> int:
        return self.model.max_text_length

    @property
    def processor_dir(self) -> Path:
        return self.directory / self.processor

    def graph_names(self) -> list[str]:
        return list(self.graphs)

    def graph_spec(self, name: str) -> GraphSpec:
        return self.graphs[name].spec

    def graph_specs(self) -> dict[str, GraphSpec]:
        return {name: entry.spec for name, entry in self.graphs.items()}

    def graph_path(self, name: str) -> Path:
        return self.directory / self.graphs[name].file

    def graph_files(self, name: str) -> list[Path]:
        """The graph file and, for graphs over 2 GB, its external-data file ``<file>.data``."""
        path = self.graph_path(name)
        data = path.with_name(path.name + ".data")
        return [path] + ([data] if data.exists() else [])

    def engine(self, name: str) -> EngineEntry:
        """The TensorRT engine of graph ``name`` (written by ``bgevl-export build-engines``)."""
        if name not in self.engines:
            raise BgevlError(f"{self.directory} has no TensorRT engine for graph {name!r}; build the engines with "
                             f"`bgevl-export build-engines {self.directory}` on a machine with TensorRT and a GPU")
        return self.engines[name]

    def path_of(self, relative: str) -> Path:
        return self.directory / relative

    # --- JSON -----------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "created": self.created,
            "model": asdict(self.model),
            "precision": self.precision,
            "int8_mode": self.int8_mode,
            "calibration": self.calibration,
            "opset": self.opset,
            "processor_dir": self.processor,
            "graphs": {name: entry.to_json() for name, entry in self.graphs.items()},
            "recipe": self.recipe,
            "validation": self.validation.to_json(),
            "engines": {name: asdict(entry) for name, entry in self.engines.items()},
            "engine_validation": self.engine_validation.to_json(),
            "versions": self.versions,
            "command": self.command,
            **({"quality": self.quality} if self.quality is not None else {}),
            "pipeline": [asdict(step) for step in self.pipeline],
        }

    @classmethod
    def from_json(cls, directory: Path, data: dict[str, Any]) -> "Manifest":
        return cls(
            directory=Path(directory), created=data["created"], model=ModelInfo(**data["model"]),
            precision=data["precision"], int8_mode=data.get("int8_mode"), calibration=data.get("calibration"),
            opset=int(data["opset"]), processor=data["processor_dir"],
            graphs={name: GraphEntry.from_json(g) for name, g in data["graphs"].items()},
            recipe=data.get("recipe") or {}, validation=Validation.from_json(data.get("validation")),
            versions=data.get("versions") or {}, command=data.get("command"),
            engines={name: EngineEntry(**e) for name, e in (data.get("engines") or {}).items()},
            engine_validation=Validation.from_json(data.get("engine_validation")),
            quality=data.get("quality"),
            pipeline=[PipelineStep(**step) for step in data.get("pipeline") or []],
        )


def write_manifest(manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically (a temporary file renamed over it), so a reader or a crash
    never sees half a manifest; updates of a finished export (the engines section) rely on it."""
    path = manifest.directory / MANIFEST_NAME
    partial = path.with_name(f".{MANIFEST_NAME}.partial")
    partial.write_text(json.dumps(manifest.to_json(), indent=2, default=str) + "\n")
    os.replace(partial, path)
    return path


def read_manifest(directory: str | os.PathLike[str]) -> Manifest:
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
    try:
        manifest = Manifest.from_json(directory, data)
    except (KeyError, TypeError, ValueError) as exc:
        raise BgevlError(f"{path} is incomplete ({type(exc).__name__}: {exc}); re-run the export") from None
    for name in manifest.graphs:
        if not manifest.graph_path(name).is_file():
            raise BgevlError(f"{path} lists graph {name!r} as {manifest.graphs[name].file}, which is missing; "
                             f"re-run the export")
    return manifest
