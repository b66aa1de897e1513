"""Evaluating exports on the same items: embed with each (export, backend), rank, compare with the reference.

:func:`evaluate` embeds the data of a :class:`~bgevl.quality.data.QualityData` with each run (an
export on a backend, ``Embedder.load``'s options), through the corpus pipeline's ``BatchEmbedder``
(reading, decoding and preprocessing in threads; an item that fails is its own failure). Items that
any run could not embed are left out of every run, so all runs are measured on the same items. Then,
per task:

* ``t2i``: each caption queries the images; relevant: its image (recall@k);
* ``i2t``: each image queries the captions; relevant: its captions (recall@k: at least one in the top k);
* ``composed``: each reference image + modification text queries the gallery, the reference image
  itself left out (CIRR); recall@k counts the first target (CIRR's one target, CIRCO's
  ``target_img_id``), mAP@k all targets (CIRCO).

Queries and candidates are embedded with the role and instruction the runtime takes
(``Embedder.encode``): for families where roles matter (``Family.roles_matter``) queries are
``role="query"`` with a task instruction (composed: the export's default instruction; text->image and
image->text: MMEB's MSCOCO instructions) and gallery items ``role="candidate"``; elsewhere each item is
embedded once. The report holds each metric with its bootstrap 95 % interval, the paired difference to
the reference run with its interval, and the top-10 overlap with the reference's rankings.
"""

from __future__ import annotations

import datetime as _dt
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from bgevl.core.errors import BgevlError
from bgevl.core.family import CANDIDATE, COMPOSED, IMAGE, QUERY, TEXT
from bgevl.quality import metrics as M
from bgevl.quality.data import QualityData

FORMAT = "bgevl-quality/1"
#: MMEB's MSCOCO_t2i and MSCOCO_i2t query instructions (VLM2Vec), for families whose queries take one
T2I_INSTRUCTION = "Find me an everyday image that matches the given caption: "
I2T_INSTRUCTION = "Find an image caption describing the given everyday image."
TASKS = ("t2i", "i2t", "composed")
TASK_TITLES = {"t2i": "text -> image", "i2t": "image -> text", "composed": "composed (image + text -> image)"}


@dataclass
class RunSpec:
    """One export on one backend (``Embedder.load``'s options)."""

    export: Path
    backend: str = "onnxruntime"
    provider: str = "auto"
    threads: int | None = None
    openvino_precision: str = "bf16"
    label: str | None = None

    def load(self) -> Any:
        from bgevl.runtime import Embedder

        return Embedder.load(self.export, provider=self.provider, threads=self.threads, backend=self.backend,
                             openvino_precision=self.openvino_precision)


@dataclass
class EvalOptions:
    recall_k: tuple[int, ...] = (1, 5, 10)
    map_k: tuple[int, ...] = (5, 10, 25, 50)
    overlap_k: int = 10
    resamples: int = M.BOOTSTRAP_RESAMPLES
    seed: int = M.BOOTSTRAP_SEED
    #: composed queries' instruction (None: the export's default); text->image and image->text queries'
    #: (None: MMEB's); used only where roles matter, an error elsewhere when given
    instruction: str | None = None
    t2i_instruction: str | None = None
    i2t_instruction: str | None = None
    workers: int = 2
    progress: bool = True
    log_interval: float = 30.0
    #: compact output types (``bgevl.core.compact``) the reference run is also measured in: a first pass over the
    #: whole gallery in that type, then again with its top ``k * rescore_multiplier`` rescored in float32
    embedding_dtypes: tuple[str, ...] = ()
    rescore_multiplier: int = 4
    #: per run and task, the queries whose top ``overlap_k`` changed most against the reference, in the report
    examples: int = 5

    def check(self) -> None:
        from bgevl.core.compact import OUTPUT_TYPES

        for name, ks in (("--recall-k", self.recall_k), ("--map-k", self.map_k)):
            if not ks or any(k < 1 for k in ks):
                raise BgevlError(f"{name} {','.join(map(str, ks))}: give positive integers, e.g. 1,5,10")
        searchable = [t for t in OUTPUT_TYPES if t in COMPACT_SEARCH]
        unknown = [t for t in self.embedding_dtypes if t not in searchable]
        if unknown or self.rescore_multiplier < 1:
            raise BgevlError(f"--embedding-dtype {','.join(unknown) or '-'} / --rescore-multiplier "
                             f"{self.rescore_multiplier}: types are {', '.join(searchable)}, the multiplier at least 1")
        if self.overlap_k < 1 or self.resamples < 10 or self.workers < 1:
            raise BgevlError("--overlap-k and --workers must be at least 1, --bootstrap at least 10")


@dataclass
class EmbeddingSet:
    """What to embed of the data: ``items`` as ``kind`` with a role and instruction."""

    name: str
    items: list
    kind: str
    role: str | None = None
    instruction: str | None = None


#: the compact types a retrieval is measured in (``metrics.rank_compact``: FAISS's flat indexes search these)
COMPACT_SEARCH = ("int8", "uint8", "binary", "ubinary")


@dataclass
class RunResult:
    spec: RunSpec
    info: dict[str, Any]
    vectors: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    failures: dict[tuple[str, str], str] = field(default_factory=dict)
    #: a run measured in a compact type: (type, rescore multiplier or 0, the calibration ranges)
    compact: tuple[str, int, Any] | None = None


def compact_results(reference: RunResult, options: EvalOptions) -> list[RunResult]:
    """The reference run's vectors measured in each of ``options.embedding_dtypes``, without and with rescoring;
    int8/uint8 with the ranges stored with its export (``bgevl-export ranges``), which a corpus and its queries
    are quantized with."""
    from bgevl.core.compact import EmbeddingRanges, needs_ranges

    out = []
    for dtype in options.embedding_dtypes:
        ranges = EmbeddingRanges.load(Path(reference.spec.export)) if needs_ranges(dtype) else None
        if needs_ranges(dtype) and ranges is None:
            raise BgevlError(f"--embedding-dtype {dtype} needs the calibration ranges of {reference.spec.export}; compute "
                             f"them once with 'bgevl-export ranges {reference.spec.export} --data DIR' (a sample of the "
                             f"corpus, not of this evaluation's data)")
        for rescore in (0, options.rescore_multiplier):
            label = f"{reference.spec.label} as {dtype}" + (f", rescored x{rescore}" if rescore else "")
            spec = RunSpec(reference.spec.export, reference.spec.backend, label=label)
            info = {**reference.info, "label": label, "embedding_dtype": dtype, "rescore_multiplier": rescore,
                    "ranges": ranges.source if ranges is not None else None}
            out.append(RunResult(spec, info, reference.vectors, {}, (dtype, rescore, ranges)))
    return out


def embedding_sets(data: QualityData, embedder: Any, options: EvalOptions) -> tuple[list[EmbeddingSet], dict]:
    """The sets a run embeds (queries separately from candidates only where roles matter) and the
    instructions its queries take."""
    roles = embedder.family.roles_matter
    explicit = {"--instruction": options.instruction, "--t2i-instruction": options.t2i_instruction,
                "--i2t-instruction": options.i2t_instruction}
    given = [name for name, value in explicit.items() if value is not None]
    if given and not roles:
        raise BgevlError(f"{', '.join(given)}: {embedder.manifest.model.key} takes no task instruction (its queries "
                         f"embed like candidates); leave {' and '.join(given)} out")
    instructions = {"composed": options.instruction if options.instruction is not None else embedder.default_instruction,
                    "t2i": options.t2i_instruction if options.t2i_instruction is not None else T2I_INSTRUCTION,
                    "i2t": options.i2t_instruction if options.i2t_instruction is not None else I2T_INSTRUCTION}
    if not roles:
        instructions = {task: None for task in instructions}
    sets = []
    if data.pairs is not None:
        sets += [EmbeddingSet("image", data.pairs.images, IMAGE, CANDIDATE if roles else None),
                 EmbeddingSet("text", data.pairs.captions, TEXT, CANDIDATE if roles else None)]
        if roles:
            sets += [EmbeddingSet("image_query", data.pairs.images, IMAGE, QUERY, instructions["i2t"]),
                     EmbeddingSet("text_query", data.pairs.captions, TEXT, QUERY, instructions["t2i"])]
    if data.triplets is not None:
        sets += [EmbeddingSet("composed_query", data.triplets.queries, COMPOSED, QUERY if roles else None,
                              instructions["composed"]),
                 EmbeddingSet("gallery", data.triplets.gallery, IMAGE, CANDIDATE if roles else None)]
    used = (["t2i", "i2t"] if data.pairs is not None else []) + (["composed"] if data.triplets is not None else [])
    return sets, {t: instructions[t] for t in used}


def _batches(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def embed_run(spec: RunSpec, data: QualityData, options: EvalOptions, embedder: Any = None,
              say: Callable[[str], None] | None = None) -> RunResult:
    """Embed every set of ``data`` with one run (``embedder``: one already loaded for it)."""
    from bgevl.corpus.pipeline import BatchEmbedder, ItemProgress

    say = say or (lambda msg: print(msg, file=sys.stderr))
    start = time.monotonic()
    loaded = embedder is None  # one loaded here is closed here; one given is the caller's
    embedder = embedder if embedder is not None else spec.load()
    sets, instructions = embedding_sets(data, embedder, options)
    manifest = embedder.manifest
    info = {"label": spec.label, "export": str(Path(spec.export).resolve()), "backend": spec.backend,
            "model": manifest.model.key, "family": manifest.family, "weights": manifest.model.weights,
            "precision": manifest.precision, "int8_mode": manifest.int8_mode, "embedding_dim": manifest.embedding_dim,
            "instructions": instructions}
    result = RunResult(spec, info)
    total = sum(len(s.items) for s in sets)
    progress = ItemProgress(total, options.log_interval, enabled=options.progress)
    say(f"{spec.label}: embedding {total} items ({', '.join(f'{len(s.items)} {s.name}' for s in sets)})")
    size = embedder.max_batch * 4
    try:
        with ThreadPoolExecutor(options.workers, thread_name_prefix="bgevl-eval") as pool:
            for spec_set in sets:
                batcher = BatchEmbedder(embedder, [spec_set.kind], spec_set.role, spec_set.instruction)
                vectors: dict[str, np.ndarray] = {}
                pending: deque = deque()
                batches = iter(_batches(spec_set.items, size))
                for batch in batches:  # a bounded read-ahead: 2 batches per worker
                    pending.append(pool.submit(batcher.prepare, batch))
                    if len(pending) >= 2 * options.workers:
                        break
                while pending:
                    done = batcher.run(pending.popleft().result())
                    nxt = next(batches, None)
                    if nxt is not None:
                        pending.append(pool.submit(batcher.prepare, nxt))
                    if done.items:
                        array = np.concatenate(done.vectors[spec_set.kind])
                        vectors.update(zip((item.id for item in done.items), array))
                    for item, reason in done.failed:
                        result.failures[(spec_set.name, item.id)] = reason
                    progress.update(len(done.items), len(done.failed))
                result.vectors[spec_set.name] = vectors
    finally:
        progress.close()
        if loaded:
            embedder.close()
    info["seconds"] = round(time.monotonic() - start, 3)
    return result


@dataclass
class Task:
    """One retrieval task on the items every run embedded: which set's vectors query which, the
    relevant gallery positions of each query, the gallery position left out of each ranking."""

    name: str
    query_set: str
    query_ids: list[str]
    gallery_set: str
    gallery_ids: list[str]
    positives: list[list[int]]
    exclude: list[int] | None = None
    #: recall's relevant items where they differ from ``positives`` (composed: the first target only)
    recall_positives: list[list[int]] | None = None


def _kept(results: list[RunResult], name: str) -> set[str]:
    kept = None
    for result in results:
        ids = set(result.vectors.get(name, {}))
        kept = ids if kept is None else kept & ids
    return kept or set()


def build_tasks(data: QualityData, results: list[RunResult], roles: bool) -> list[Task]:
    """The tasks on the items embedded by every run (each list in the data's order)."""
    tasks = []
    if data.pairs is not None:
        p = data.pairs
        images = _kept(results, "image") & (_kept(results, "image_query") if roles else _kept(results, "image"))
        texts = _kept(results, "text") & (_kept(results, "text_query") if roles else _kept(results, "text"))
        image_ids = [item.id for item in p.images if item.id in images]
        position = {image_id: n for n, image_id in enumerate(image_ids)}
        captions = [(item.id, p.images[owner].id) for item, owner in zip(p.captions, p.caption_image)
                    if item.id in texts and p.images[owner].id in position]
        tasks.append(Task("t2i", "text_query" if roles else "text", [c for c, _ in captions], "image", image_ids,
                          [[position[i]] for _, i in captions]))
        owned: dict[str, list[int]] = {image_id: [] for image_id in image_ids}
        for n, (_, image_id) in enumerate(captions):
            owned[image_id].append(n)
        tasks.append(Task("i2t", "image_query" if roles else "image", image_ids, "text", [c for c, _ in captions],
                          [owned[i] for i in image_ids]))
    if data.triplets is not None:
        t = data.triplets
        gallery = _kept(results, "gallery")
        queries = _kept(results, "composed_query")
        gallery_ids = [item.id for item in t.gallery if item.id in gallery]
        position = {gid: n for n, gid in enumerate(gallery_ids)}
        rows = [(q.id, ref, targets) for q, ref, targets in zip(t.queries, t.reference, t.targets) if q.id in queries]
        positives = [[position[t.gallery[g].id] for g in targets if t.gallery[g].id in position] for _, _, targets in rows]
        first = [[position[t.gallery[targets[0]].id]] if t.gallery[targets[0]].id in position else []
                 for _, _, targets in rows]
        exclude = [position.get(t.gallery[ref].id, -1) for _, ref, _ in rows]
        tasks.append(Task("composed", "composed_query", [q for q, _, _ in rows], "gallery", gallery_ids, positives,
                          exclude, first))
    return tasks


def _chance(task: Task, n_relevant: np.ndarray, ks: tuple[int, ...]) -> dict[str, float | None]:
    """A random ranking's mean recall@k on the task's queries, in percent."""
    candidates = np.full(len(task.query_ids), len(task.gallery_ids))
    if task.exclude is not None:
        candidates -= np.asarray(task.exclude) >= 0
    out = {}
    for k in ks:
        per_query = M.chance_recall_at_k(n_relevant, candidates, k)
        out[f"R@{k}"] = float(per_query[~np.isnan(per_query)].mean()) * 100 if (~np.isnan(per_query)).any() else None
    return out


def _vectors(result: RunResult, name: str, ids: list[str], dim: int) -> np.ndarray:
    return np.stack([result.vectors[name][i] for i in ids]) if ids else np.zeros((0, dim), np.float32)


def task_figures(task: Task, results: list[RunResult], options: EvalOptions) -> list[dict[str, Any]]:
    """Per run: the task's figures (recall@k, mAP@k for composed; each with the delta to run 0) and the
    top-k overlap with run 0's rankings."""
    maps = options.map_k if task.name == "composed" else ()
    depth = max([*options.recall_k, *maps, options.overlap_k])
    recall_positives = task.recall_positives if task.recall_positives is not None else task.positives
    chance: dict[str, float | None] = {}
    per_run = []
    for result in results:
        dim = result.info["embedding_dim"]
        queries = _vectors(result, task.query_set, task.query_ids, dim)
        gallery = _vectors(result, task.gallery_set, task.gallery_ids, dim)
        if result.compact is None:
            ranking = M.rank(queries, gallery, depth, task.exclude)
        else:
            dtype, rescore, ranges = result.compact
            ranking = M.rank_compact(queries, gallery, depth, dtype, ranges, task.exclude, rescore)
        rel, count = M.relevance(ranking, recall_positives)
        values = {f"R@{k}": M.recall_at_k(rel, count, k) for k in options.recall_k}
        chance = chance or _chance(task, count, options.recall_k)
        rel, count = M.relevance(ranking, task.positives)
        values.update({f"mAP@{k}": M.average_precision_at_k(rel, count, k) for k in maps})
        per_run.append((ranking, values))
    out = []
    reference_ranking, reference_values = per_run[0]
    for n, (ranking, values) in enumerate(per_run):
        figures = [M.figure(name, v, None if n == 0 else reference_values[name], resamples=options.resamples,
                            seed=options.seed) for name, v in values.items()]
        for fig in figures:
            fig.chance = chance.get(fig.metric)
        overlaps = M.overlap_at_k(ranking, reference_ranking, options.overlap_k)
        overlap = M.figure(f"top-{options.overlap_k} overlap", overlaps, resamples=options.resamples, seed=options.seed)
        out.append({"figures": [f.to_json() for f in figures], "overlap": overlap.to_json(),
                    "queries": len(task.query_ids), "gallery": len(task.gallery_ids),
                    "query_set": task.query_set, "gallery_set": task.gallery_set,
                    "changed": [] if n == 0 else _changed(task, ranking, reference_ranking, overlaps, options)})
    return out


def _changed(task: Task, ranking: np.ndarray, reference: np.ndarray, overlaps: np.ndarray,
             options: EvalOptions) -> list[dict[str, Any]]:
    """The queries whose top k changed most against the reference's (least overlap; ties in query order), with
    both top-k lists and the relevant items, by id: what the HTML report shows."""
    k = options.overlap_k
    out = []
    for q in np.argsort(overlaps, kind="stable")[:options.examples]:
        if overlaps[q] >= 1:
            break
        out.append({"query": task.query_ids[q], "overlap": round(float(overlaps[q]), 4),
                    "reference": [task.gallery_ids[g] for g in reference[q, :k]],
                    "run": [task.gallery_ids[g] for g in ranking[q, :k]],
                    "relevant": [task.gallery_ids[g] for g in task.positives[q]]})
    return out


def _labels(runs: list[RunSpec]) -> None:
    seen: dict[str, int] = {}
    several_backends = len({r.backend for r in runs}) > 1
    for run in runs:
        base = run.label or (Path(run.export).resolve().name + (f" ({run.backend})" if several_backends else ""))
        seen[base] = seen.get(base, 0) + 1
        run.label = base if seen[base] == 1 else f"{base} #{seen[base]}"


def evaluate(data: QualityData, runs: list[RunSpec], options: EvalOptions | None = None,
             embedders: dict[int, Any] | None = None, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Evaluate ``runs`` (the first is the reference) on ``data``; returns the report (JSON-ready).
    ``embedders``: run index -> an ``Embedder`` already loaded for it."""
    options = options or EvalOptions()
    options.check()
    if not runs:
        raise BgevlError("no export to evaluate; give --export DIR")
    _labels(runs)
    results = []
    for n, run in enumerate(runs):
        results.append(embed_run(run, data, options, (embedders or {}).get(n), say))
    families_with_roles = {r.spec.label: "image_query" in r.vectors or "text_query" in r.vectors for r in results}
    if len(set(families_with_roles.values())) > 1:
        raise BgevlError("the exports embed queries differently (some take roles and instructions, some not): "
                         "evaluate exports of one model against each other")
    roles = next(iter(families_with_roles.values()))
    dims = {r.info["embedding_dim"] for r in results}
    if len(dims) > 1:
        raise BgevlError(f"the exports have different embedding sizes ({sorted(dims)}): compare exports of one model")
    tasks = build_tasks(data, results, roles)
    results += compact_results(results[0], options)
    failures: dict[str, str] = {}
    failures.update(getattr(data.pairs, "failures", {}) or {})
    failures.update(getattr(data.triplets, "failures", {}) or {})
    for result in results:
        for (set_name, item_id), reason in result.failures.items():
            failures.setdefault(item_id, f"{reason} ({result.spec.label}, {set_name})")
    report: dict[str, Any] = {
        "format": FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "data": data.describe(),
        "reference": results[0].spec.label,
        "options": {k: v for k, v in asdict(options).items() if k not in ("progress", "log_interval", "workers")},
        "excluded": {"count": len(failures), "items": [{"id": k, "reason": v} for k, v in list(failures.items())[:100]]},
        "runs": [{**r.info, "tasks": {}} for r in results],
    }
    for task in tasks:
        for run_report, task_report in zip(report["runs"], task_figures(task, results, options)):
            run_report["tasks"][task.name] = task_report
    return report


def worst_drop(report: dict[str, Any]) -> dict[str, Any] | None:
    """The largest fall of a recall / mAP figure against the reference over every export run and task (the
    compact-type runs of ``--embedding-dtype`` left out):
    ``{run, task, metric, delta, delta_ci95, queries}`` (None where nothing fell)."""
    worst = None
    for run in report["runs"][1:]:
        if run.get("embedding_dtype"):  # a compact type's loss is what --embedding-dtype measures, not a regression
            continue
        for task, body in run["tasks"].items():
            for fig in body["figures"]:
                if fig.get("delta") is not None and fig["delta"] < 0 and (worst is None or fig["delta"] < worst["delta"]):
                    worst = {"run": run["label"], "task": task, **fig}
    return worst


def _cell(fig: dict[str, Any], reference: bool) -> str:
    def num(v: Any, sign: bool = False) -> str:
        return "n/a" if v is None else (f"{v:+.1f}" if sign else f"{v:.1f}")

    if reference or fig.get("delta") is None:
        return f"{num(fig['value'])} [{num(fig['ci95'][0])}, {num(fig['ci95'][1])}]"
    return (f"{num(fig['value'])} (Δ {num(fig['delta'], True)} [{num(fig['delta_ci95'][0], True)}, "
            f"{num(fig['delta_ci95'][1], True)}])")


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: per task a table of metrics (rows) by run (columns); the reference's
    cells give the value and its 95 % interval, the others' the value and the difference to the
    reference with its 95 % interval (paired bootstrap over queries)."""
    runs = report["runs"]
    data = report["data"]
    lines = [f"# Retrieval quality against {report['reference']}", ""]
    parts = []
    if "pairs" in data:
        p = data["pairs"]
        parts.append(f"pairs: {p['images']} images, {p['captions']} captions ({p.get('path', '')})")
    if "triplets" in data:
        t = data["triplets"]
        parts.append(f"composed: {t['queries']} queries over {t['gallery']} gallery images, "
                     f"{t['targets_per_query']} targets per query ({t['triplets']})")
    lines += [f"Data: {'; '.join(parts)}.", ""]
    weights = {r["weights"] for r in runs}
    if weights != {"pretrained"}:
        lines += [f"Weights: {', '.join(sorted(weights))} (random-weight figures describe the export, not the model's "
                  f"retrieval quality).", ""]
    lines += ["| run | model | precision | backend | instructions |", "| --- | --- | --- | --- | --- |"]
    for r in runs:
        inst = "; ".join(f"{k}: {v!r}" for k, v in r["instructions"].items() if v) or "none"
        precision = r["precision"] + (f" ({r['int8_mode']})" if r.get("int8_mode") else "")
        lines.append(f"| {r['label']} | {r['model']} | {precision} | {r['backend']} | {inst} |")
    lines.append("")
    for task in TASKS:
        if task not in runs[0]["tasks"]:
            continue
        body = runs[0]["tasks"][task]
        lines += [f"## {TASK_TITLES[task]}: {body['queries']} queries, gallery of {body['gallery']}", "",
                  "| metric | chance | " + " | ".join(r["label"] for r in runs) + " |",
                  "| --- | --- |" + " --- |" * len(runs)]
        for i, fig in enumerate(body["figures"]):
            chance = f"{fig['chance']:.1f}" if fig.get("chance") is not None else ""
            lines.append(f"| {fig['metric']} | {chance} | " + " | ".join(_cell(r["tasks"][task]["figures"][i], n == 0)
                                                                          for n, r in enumerate(runs)) + " |")
        overlap = [r["tasks"][task]["overlap"] for r in runs]
        lines.append(f"| {overlap[0]['metric']} | | " + " | ".join(_cell(o, True) for o in overlap) + " |")
        lines.append("")
    lines.append("Figures in percent over queries; chance: a random ranking's recall; [..]: bootstrap 95 % interval "
                 f"({report['options']['resamples']} resamples, seed {report['options']['seed']}); Δ: the paired "
                 f"difference to {report['reference']} on the same queries.")
    if report["excluded"]["count"]:
        first = report["excluded"]["items"][0]
        lines += ["", f"{report['excluded']['count']} items could not be evaluated and were left out of every run "
                      f"(e.g. {first['id']}: {first['reason']}); all are listed in the JSON report."]
    return "\n".join(lines) + "\n"
