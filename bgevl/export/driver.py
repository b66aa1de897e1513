"""The one export driver behind ``bgevl-export``: checkpoint -> ONNX graphs -> precision -> validation -> manifest.

It runs any registered model family (``bgevl.families``) through the same steps; what differs
between families (the graphs, the torch modules, the probe requests, the int8 form, the
recipe) is asked of the family object. Everything is written into a staging directory next to
the output and moved into place only when the whole job (validation included) has succeeded,
so a failure leaves nothing half-written. :func:`build_artifacts` runs the whole command:
export, then TensorRT engines where they can be built, then a Triton repository.
"""

from __future__ import annotations

import datetime as _dt
import platform
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

from bgevl import __version__
from bgevl.checkpoints import ResolvedCheckpoint, resolve_checkpoint
from bgevl.core.errors import BgevlError
from bgevl.core.registry import family_of, get_model_spec, int8_modes
from bgevl.core.family import KINDS, ExportedModel, Family, Feeds, Int8Form, Request
from bgevl.core.interrupts import raise_if_interrupted
from bgevl.core.manifest import MANIFEST_NAME, GraphEntry, Manifest, ModelInfo, PipelineStep, Validation, write_manifest
from bgevl.core.staging import check_replaceable, output_lock, staged_directory
from bgevl.core.probes import ProbeSet, builtin_calibration_set, load_calibration_dir, probe_set
from bgevl.core.options import ExportOptions
from bgevl.core.specs import ONNX_OPSET, PRECISIONS, GraphSpec, ModelSpec

CALIBRATION_BATCH = 8


class StepLog:
    """The export's numbered steps: one line each for the user, and a :class:`PipelineStep` record each
    (name, status, seconds) for the manifest."""

    def __init__(self, total: int, sink: Callable[[str], None] | None = None):
        self.total, self.step, self.start = total, 0, time.perf_counter()
        self.sink = sink or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._records: list[PipelineStep] = []
        self._current: tuple[str, str, float] | None = None

    def __call__(self, message: str, *, step: str, status: str = "done") -> None:
        """Start step ``step`` (its line says ``message``); ``status`` is how it will be recorded."""
        raise_if_interrupted()
        self.close()
        self.step += 1
        now = time.perf_counter()
        self._current = (step, status, now)
        self.sink(f"[{self.step}/{self.total}] {message} (t={now - self.start:.1f}s)")

    def close(self) -> None:
        if self._current is not None:
            name, status, began = self._current
            self._records.append(PipelineStep(name, status, round(time.perf_counter() - began, 3)))
            self._current = None

    def records(self) -> list[PipelineStep]:
        """The steps so far, the one in progress closed."""
        self.close()
        return list(self._records)

    def info(self, message: str) -> None:
        self.sink(f"      {message}")


def _check_options(opts: ExportOptions) -> None:
    if opts.precision not in PRECISIONS:
        raise BgevlError(f"--precision {opts.precision!r}: choose one of {', '.join(PRECISIONS)}")
    modes = int8_modes()
    if opts.int8_mode not in modes:
        raise BgevlError(f"--int8-mode {opts.int8_mode!r}: choose one of {', '.join(modes)}")
    spec = get_model_spec(opts.model)
    family = family_of(spec)
    default_opt, default_max = family.default_batch
    opts.max_batch = opts.max_batch or max(default_max, opts.opt_batch or 0)
    opts.opt_batch = opts.opt_batch or min(default_opt, opts.max_batch)
    if not 1 <= opts.opt_batch <= opts.max_batch:
        raise BgevlError(f"need 1 <= --opt-batch <= --max-batch, got {opts.opt_batch} and {opts.max_batch}")
    if opts.max_sequence_length < 16:
        raise BgevlError(f"--max-sequence-length {opts.max_sequence_length}: need at least 16 tokens")
    check_replaceable(Path(opts.output), opts.overwrite, is_export, EXPORT_WHAT, "--output", export_foreign_files)
    if opts.calibration_data is not None and opts.precision not in ("int8", "fp8"):
        raise BgevlError("--calibration-data only applies to --precision int8 and fp8")
    if opts.precision == "fp8" and not family.supports_fp8:
        raise BgevlError(f"--precision fp8: the {family.name} family has no fp8 form; use --precision fp16 or int8")
    if opts.max_recall_drop is not None and (opts.quality_data is None or opts.max_recall_drop < 0):
        raise BgevlError(f"--max-recall-drop {opts.max_recall_drop:g}: give it with --quality-data DIR, as a drop in "
                         f"points of 0 or more")
    if opts.precision == "fp32" and spec.fp32_too_large and not opts.force_fp32:
        raise BgevlError(
            f"--precision fp32 for {spec.key} ({spec.billions:.2f}B parameters) needs about "
            f"{spec.billions * 4:.0f} GB for the weights alone and about twice that while exporting; "
            f"fp16 is the production precision of this model. Use --precision fp16 (or int8), or pass "
            f"--force-fp32 on a machine with the memory for it."
        )
    family.check_export_options(spec, opts)
    if opts.precision == "int8":
        family.int8_form(opts.int8_mode)  # a mode the family does not have is refused before loading


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "bgevl-export": __version__}
    for dist in ("torch", "transformers", "onnx", "onnxruntime", "onnxconverter-common", "onnxscript"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def convert_graph(graph: GraphSpec, src: Path, dst: Path, precision: str, quantize: Callable[[], dict],
                  fp16_kept: Callable[[Any], dict[str, list[str]]] | None = None) -> dict:
    """Write the exported fp32 graph ``src`` at ``precision`` to ``dst`` and check it; returns what was
    done, for the manifest. ``quantize`` is the family's int8 or fp8 pass, ``fp16_kept`` what its fp16 pass
    keeps in float32 (``Family.fp16_keep_float32``)."""
    import onnx

    from bgevl.graphs import onnx_passes

    if precision == "fp32":
        onnx_passes.save_onnx(onnx.load(str(src)), dst)
        details = {"method": "float32 as exported"}
    elif precision == "fp16":
        details = onnx_passes.fp16_graph(src, dst, graph.normalized_output, fp16_kept)
    else:
        details = quantize()
    onnx_passes.check_onnx(dst)
    return details


def _kind_counts(requests: list[Request]) -> str:
    kinds = [k for r in requests for k in r.kinds()]
    return ", ".join(f"{kinds.count(k)} {k}" for k in KINDS if k in kinds)


#: What ``--overwrite`` may replace at ``--output``: a previous export.
EXPORT_WHAT = "a bgevl export (manifest.json)"


def is_export(directory: Path) -> bool:
    return (directory / MANIFEST_NAME).is_file()


def export_foreign_files(directory: Path) -> list[str]:
    """The files in an earlier export that it did not write (its manifest, graphs, processor files, validation
    arrays and TensorRT engines are its own): a user's notes put there, which ``--overwrite`` must not delete."""
    from bgevl.core.manifest import read_manifest
    from bgevl.graphs.engines import ENGINE_DIR

    directory = Path(directory)
    try:
        manifest = read_manifest(directory)
    except BgevlError:
        return []  # not readable as an export: is_export and the manifest's own checks answer for it
    owned = {MANIFEST_NAME, manifest.validation.arrays or ""}
    owned |= {str(p.relative_to(directory)) for name in manifest.graphs for p in manifest.graph_files(name)}
    trees = (manifest.processor.rstrip("/") + "/", ENGINE_DIR + "/")
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if (p.is_file() or p.is_symlink()) and str(p.relative_to(directory)) not in owned
                  and not str(p.relative_to(directory)).startswith(trees))


@dataclass
class ExportRun:
    """What the steps of one export share: the options, the family, the staging directory (moved into place
    only when every step has succeeded) and what each step leaves for the next."""

    opts: ExportOptions
    spec: ModelSpec
    family: Family
    staging: Path
    work: Path
    progress: StepLog
    quality_data: Any = None
    ckpt: ResolvedCheckpoint | None = None
    exported: ExportedModel | None = None
    graphs: dict[str, GraphSpec] = field(default_factory=dict)
    probes: ProbeSet | None = None
    requests: list[Request] = field(default_factory=list)
    prepared: list[Feeds] = field(default_factory=list)
    modules: dict[str, Any] | None = None
    precision_details: dict[str, dict[str, Any]] = field(default_factory=dict)
    calibration_info: dict[str, Any] | None = None
    model_info: ModelInfo | None = None
    probe_description: dict[str, Any] = field(default_factory=dict)
    processor: Any = None
    recipe: dict[str, Any] = field(default_factory=dict)
    validation: Validation = field(default_factory=Validation)
    manifest: Manifest | None = None

    @property
    def fp32_dir(self) -> Path:
        return self.work / "fp32"


@dataclass(frozen=True)
class ExportStep:
    """One step of the export: ``run`` does it; ``applies`` says whether this export has it at all (a step
    that does not apply is neither counted nor recorded); ``skipped`` names why an applicable step is
    skipped (recorded in the manifest's pipeline with status "skipped"), or is None."""

    name: str
    run: Callable[[ExportRun], None]
    applies: Callable[[ExportOptions], bool] = lambda opts: True
    skipped: Callable[[ExportOptions], str | None] = lambda opts: None


def _load(run: ExportRun) -> None:
    opts, spec = run.opts, run.spec
    source = "--model-path" if opts.model_path else ("generated" if spec.generated or opts.random_weights else "hub")
    run.progress(f"loading {spec.key} ({source})", step="load")
    run.ckpt = resolve_checkpoint(spec, model_path=opts.model_path, random_weights=opts.random_weights, workdir=run.work)
    run.exported = run.family.prepare_export(run.ckpt.path, spec, opts)
    run.graphs = run.exported.graphs
    run.progress.info(f"{run.ckpt.source}; {run.exported.summary}")
    run.probes = probe_set(opts.probe_count)
    run.requests = run.family.validation_requests(run.probes)
    run.prepared = [run.exported.preprocessor.prepare(r) for r in run.requests]
    run.modules = run.family.graph_modules(run.exported)


def _export_graphs(run: ExportRun) -> None:
    from bgevl.graphs import onnx_passes

    assert run.modules is not None
    run.progress(f"exporting {len(run.graphs)} graphs to ONNX (opset {ONNX_OPSET}, fp32)", step="onnx-export")
    run.fp32_dir.mkdir()
    examples = run.family.example_feeds(run.graphs, run.modules, run.prepared)
    for name, graph in run.graphs.items():
        onnx_passes.export_torch_graph(run.modules[name], graph, examples[name], run.fp32_dir / graph.filename)
        run.progress.info(f"{graph.filename}: {onnx_passes.file_size(run.fp32_dir / graph.filename) / 1e6:.1f} MB")


def _calibration(run: ExportRun, int8_form: Int8Form | None) -> tuple[list[Any], list[str]] | None:
    """The calibration set of a calibrated int8 form or of fp8 (``--calibration-data`` or the built-in one)."""
    opts = run.opts
    if not ((int8_form is not None and int8_form.calibrated) or opts.precision == "fp8"):
        return None
    if opts.calibration_data:
        calibration = load_calibration_dir(opts.calibration_data)
        run.calibration_info = {"source": str(Path(opts.calibration_data).resolve())}
    else:
        calibration = builtin_calibration_set(opts.calibration_size)
        run.calibration_info = {"source": "built-in synthetic set (bgevl.core.probes.builtin_calibration_set)"}
    run.calibration_info.update(images=len(calibration[0]), texts=len(calibration[1]))
    run.progress.info(f"calibration: {run.calibration_info['source']} ({run.calibration_info['images']} images, "
                      f"{run.calibration_info['texts']} texts)")
    return calibration


@dataclass(frozen=True)
class _Quantize:
    """The int8 form or fp8 the family declares, written by the graph services (``bgevl.graphs.precision``) on
    one graph (``convert_graph``'s ``quantize``), its calibration feeds prepared only when the pass runs."""

    run: ExportRun
    graph: GraphSpec
    src: Path
    dst: Path
    int8_form: Int8Form | None
    calibration: tuple[list[Any], list[str]] | None

    def feeds(self) -> list[Feeds]:
        assert self.calibration is not None and self.run.exported is not None
        return self.run.family.calibration_feeds(self.run.exported.preprocessor, self.graph, *self.calibration,
                                                 CALIBRATION_BATCH)

    def __call__(self) -> dict[str, Any]:
        from bgevl.graphs import precision

        kept = partial(self.run.family.fp16_keep_float32, self.graph)  # the family's float32 islands
        feeds = self.feeds if self.calibration is not None else None
        if self.run.opts.precision == "fp8":
            assert feeds is not None
            return precision.write_fp8(self.graph, self.src, self.dst, feeds, kept)
        assert self.int8_form is not None
        return precision.write_int8(self.int8_form, self.graph, self.src, self.dst, feeds, kept)


def _convert(run: ExportRun) -> None:
    opts, family, exported = run.opts, run.family, run.exported
    assert exported is not None and run.ckpt is not None
    int8_form = family.int8_form(opts.int8_mode) if opts.precision == "int8" else None
    run.progress(f"converting to {opts.precision}" + (f" ({int8_form.name})" if int8_form else ""), step="precision")
    calibration = _calibration(run, int8_form)
    for name, graph in run.graphs.items():
        src, dst = run.fp32_dir / graph.filename, run.staging / graph.filename
        run.precision_details[name] = convert_graph(
            graph, src, dst, opts.precision, quantize=_Quantize(run, graph, src, dst, int8_form, calibration),
            fp16_kept=partial(family.fp16_keep_float32, graph))
    run.processor, run.recipe = exported.processor, exported.recipe
    run.model_info = ModelInfo(run.spec.key, family.name, run.spec.description, run.ckpt.source, run.ckpt.weights,
                               exported.embedding_dim, exported.max_text_length, exported.parameters, exported.details)
    run.probe_description = family.probe_description(exported)
    run.modules = run.exported = None  # the reference is loaded on its own next; do not hold two copies


def _validate(run: ExportRun) -> None:
    from bgevl.core.parity import (
        VALIDATION_ARRAYS, check_thresholds, format_figures, parity, reference_arrays, save_arrays, threshold_for,
    )
    from bgevl.runtime.runners import OnnxRunner, runner_call

    opts, probes = run.opts, run.probes
    assert probes is not None and run.ckpt is not None
    run.progress(f"validating against the original's fp32 embeddings on {_kind_counts(run.requests)} items "
                 f"(images {', '.join(sorted({im.mode for im in probes.images}))})", step="validation")
    original = run.family.original(run.ckpt.path, run.recipe)  # computed with the export's declarations
    arrays = reference_arrays(run.prepared, [r.kinds() for r in run.requests], [original.embed(r) for r in run.requests])
    reference = original.DESCRIPTION
    del original
    runners = {name: OnnxRunner(g, run.staging / g.filename) for name, g in run.graphs.items()}
    figures = parity(run.family, run.graphs, arrays, runner_call(runners))
    save_arrays(run.staging / VALIDATION_ARRAYS, arrays)
    run.progress.info("parity vs the original's fp32 embeddings (ONNX Runtime CPU):\n" + format_figures(figures))
    threshold = threshold_for(opts.precision, opts.min_cosine)
    run.validation = Validation(
        performed=True, reference=reference, runtime="onnxruntime CPUExecutionProvider",
        probe_set={**probes.describe(), "requests": len(run.requests), **run.probe_description},
        arrays=VALIDATION_ARRAYS, figures=figures,
        **check_thresholds(figures, opts.precision, threshold, run.ckpt.weights))


def _write_manifest(run: ExportRun) -> None:
    from bgevl.graphs import onnx_passes

    opts, staging = run.opts, run.staging
    assert run.model_info is not None
    run.progress("writing processor files and manifest", step="manifest")
    run.processor.save_pretrained(staging / "processor")
    run.manifest = Manifest(
        directory=staging,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        model=run.model_info, precision=opts.precision,
        int8_mode=opts.int8_mode if opts.precision == "int8" else None, calibration=run.calibration_info,
        opset=ONNX_OPSET, processor="processor",
        graphs={name: GraphEntry(g, opts.precision, ONNX_OPSET, onnx_passes.file_size(staging / g.filename),
                                 run.precision_details[name]) for name, g in run.graphs.items()},
        recipe=run.recipe, validation=run.validation, versions=_versions(), command=opts.command,
        pipeline=run.progress.records())
    write_manifest(run.manifest)


def _check_quality(run: ExportRun) -> None:
    assert run.manifest is not None
    run.manifest.quality = _quality_gate(run.opts, run.quality_data, run.manifest, run.fp32_dir, run.processor,
                                         run.progress)
    run.manifest.pipeline = run.progress.records()
    write_manifest(run.manifest)


#: The export, in order (``run_export`` is their loop).
EXPORT_STEPS = (
    ExportStep("load", _load),
    ExportStep("onnx-export", _export_graphs),
    ExportStep("precision", _convert),
    ExportStep("validation", _validate, skipped=lambda opts: None if opts.validate else "--no-validate"),
    ExportStep("manifest", _write_manifest),
    ExportStep("quality-gate", _check_quality, applies=lambda opts: opts.quality_data is not None),
)


def run_export(opts: ExportOptions, sink: Callable[[str], None] | None = None) -> Path:
    """Run the whole export (:data:`EXPORT_STEPS`, each recorded in the manifest's pipeline section with its
    status and time); returns the output directory."""
    _check_options(opts)
    spec = get_model_spec(opts.model)
    out = Path(opts.output).expanduser().resolve()
    quality_data = None
    if opts.quality_data is not None:  # malformed data is refused before minutes of exporting
        from bgevl.quality.data import load_data

        quality_data = load_data(opts.quality_data, "--quality-data")
    steps = [step for step in EXPORT_STEPS if step.applies(opts)]
    progress = StepLog(total=len(steps) + 1, sink=sink)
    with staged_directory(out, option="--output", overwrite=opts.overwrite, is_ours=is_export, what=EXPORT_WHAT,
                          foreign=export_foreign_files) as staging, \
            tempfile.TemporaryDirectory(prefix="bgevl-export-") as work_dir:
        run = ExportRun(opts, spec, family_of(spec), staging, Path(work_dir), progress, quality_data)
        for step in steps:
            why = step.skipped(opts)
            if why is None:
                step.run(run)
            else:
                progress(f"{step.name} skipped ({why})", step=step.name, status="skipped")
    progress(f"wrote {out}", step="done")
    return out


def _quality_gate(opts: ExportOptions, data: Any, manifest: Manifest, fp32_dir: Path, processor: Any,
                  progress: StepLog) -> dict:
    """Retrieval quality of the staged export against the fp32 graphs exported on the way (an export of
    their own in ``fp32_dir``); refused over ``--max-recall-drop`` (``bgevl.quality.gate``)."""
    import dataclasses

    from bgevl.graphs import onnx_passes
    from bgevl.quality.gate import DEFAULT_MAX_RECALL_DROP, quality_gate

    max_drop = DEFAULT_MAX_RECALL_DROP if opts.max_recall_drop is None else opts.max_recall_drop
    progress(f"checking retrieval quality on {opts.quality_data} against the fp32 graphs (max drop {max_drop:g} points)",
             step="quality-gate")
    reference = None
    if opts.precision != "fp32":
        reference = fp32_dir
        processor.save_pretrained(fp32_dir / "processor")
        write_manifest(dataclasses.replace(
            manifest, directory=fp32_dir, precision="fp32", int8_mode=None, calibration=None, validation=Validation(),
            graphs={name: GraphEntry(entry.spec, "fp32", entry.opset, onnx_passes.file_size(fp32_dir / entry.file),
                                     {"method": "float32 as exported"}) for name, entry in manifest.graphs.items()}))
    return quality_gate(data, manifest.directory, reference, opts.precision, max_drop, progress.info)


def build_artifacts(export: ExportOptions, *, format: str = "auto", engines: Any = None, repository: Any = None,
                    sink: Callable[[str], None] | None = None, quiet: bool = False) -> Path:
    """The whole ``bgevl-export`` command: the export, then TensorRT engines (``format``: ``auto`` where
    TensorRT and a GPU are present, ``tensorrt`` required, ``onnx`` never; ``engines``:
    ``bgevl.graphs.engines.EngineOptions``), then a Triton repository (``repository``:
    ``bgevl.serving.repository.RepositoryOptions``). What would be refused after minutes of
    exporting (a repository directory that may not be replaced, TensorRT required but absent) is
    refused first."""
    with ExitStack() as locks:
        # both outputs locked from the start: a second pair of the same paths is refused before it exports
        locks.enter_context(output_lock(export.output, "--output"))
        if repository is not None:
            locks.enter_context(output_lock(repository.output, "--triton-repo"))
        return _build_artifacts(export, format, engines, repository, sink, quiet)


def _build_artifacts(export: ExportOptions, format: str, engines: Any, repository: Any,
                     sink: Callable[[str], None] | None, quiet: bool) -> Path:
    if repository is not None:
        from bgevl.serving.repository import is_repository

        check_replaceable(Path(repository.output), repository.overwrite, is_repository, "a Triton model repository",
                          "--triton-repo")
    engines_ok, engines_why = False, "--format onnx"
    if format != "onnx":
        from bgevl.runtime.tensorrt import tensorrt_status

        engines_ok, engines_why = tensorrt_status()
        if engines_ok and export.precision == "fp8":  # a GPU without FP8 is refused before minutes of exporting
            from bgevl.graphs.engines import check_device_for, precision_plan
            from bgevl.runtime.tensorrt import cuda_device

            try:
                check_device_for(precision_plan("fp8"), cuda_device())
            except BgevlError as exc:
                if format == "tensorrt":
                    raise
                engines_ok, engines_why = False, str(exc)
        if format == "tensorrt" and not engines_ok:
            raise BgevlError(f"--format tensorrt: {engines_why}. Export with --format onnx here and build the engines "
                             f"on a GPU machine with `bgevl-export build-engines DIR`")
    out = run_export(export, sink=(lambda msg: None) if quiet else sink)
    if engines_ok:
        from bgevl.graphs.engines import EngineOptions, build_engines

        build_engines(out, engines or EngineOptions(), progress=(lambda msg: None) if quiet else print)
    elif format == "auto":
        print(f"TensorRT engines not built ({engines_why}); build them on a GPU machine with: "
              f"bgevl-export build-engines {out}", file=sys.stderr)
    if repository is not None:
        repository.write(out, sink=None if quiet else print, option="--triton-repo")
    return out
