"""``bgevl-export``: the command line of the exporter."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Callable

from bgevl.core.errors import BgevlError
from bgevl.core.interrupts import run_cli
from bgevl.core.registry import all_models, families, int8_modes
from bgevl.quality.gate import DEFAULT_MAX_RECALL_DROP
from bgevl.core.specs import DEFAULT_MAX_SEQUENCE, PRECISIONS


def build_parser() -> argparse.ArgumentParser:
    """Argument groups, one per library call: "model and checkpoint" + "export" -> ``ExportOptions``
    (``run_export``), "TensorRT engines" -> ``EngineOptions`` (``build_engines``), "Triton model
    repository" -> ``RepositoryOptions`` (``write_repository``); ``build_artifacts`` runs them in turn."""
    p = argparse.ArgumentParser(
        prog="bgevl-export",
        description="Export a BGE-VL model to validated ONNX graphs (fp32, fp16 or int8) with a manifest.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    known = families()
    models = all_models()
    m = p.add_argument_group("model and checkpoint")
    m.add_argument("--model", default=None, choices=list(models),
                   help="; ".join(f"{spec.key}: {spec.hub_id or 'offline random-weight ' + known[spec.family].name}"
                                  for spec in models.values()) + " (hub models from the hub or --model-path). Default: "
                        "read from --model-path's config.json (the family, and the hub model its sizes match), else tiny")
    m.add_argument("--model-path", type=Path, default=None, help="local checkpoint directory (config.json, weights, processor files)")
    m.add_argument("--random-weights", action="store_true",
                   help="build the --model architecture with random weights, offline (for structure and speed checks)")
    e = p.add_argument_group("export")
    e.add_argument("--output", "-o", type=Path, default=None, help="output directory (default: out/<model>-<precision>)")
    e.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    e.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="fp16: float16 with LayerNorm/Softmax/final norm in float32; int8: see --int8-mode; fp8 ("
                        f"{', '.join(f.name for f in known.values() if f.supports_fp8) or 'no family'}: TensorRT on compute "
                        "capability 8.9+): FP8 E4M3 Q/DQ on the weight GEMMs, float16 elsewhere")
    e.add_argument("--int8-mode", default="qdq", choices=int8_modes(),
                   help="the int8 form of each family (declared by its int8_forms): " + _int8_forms(known))
    e.add_argument("--calibration-data", type=Path, default=None,
                   help="directory of images plus a .txt file of captions (one per line) for int8/fp8 calibration; default: the built-in synthetic set")
    e.add_argument("--calibration-size", type=int, default=32, help="images and captions in the built-in calibration set")
    e.add_argument("--no-validate", dest="validate", action="store_false", help="skip the parity check against the original")
    e.add_argument("--min-cosine", type=float, default=None,
                   help="override the validation threshold (default: fp32 0.99999, fp16 0.999, int8 0.99)")
    defaults = ", ".join(f"{f.default_batch[0]}/{f.default_batch[1]} for {name}" for name, f in known.items())
    e.add_argument("--quality-data", type=Path, default=None, metavar="DIR",
                   help="retrieval data (pairs/ and/or triplets.json with gallery/, as bgevl-eval --data reads it): the "
                        "export is evaluated on it against the fp32 graphs of the same checkpoint before anything is "
                        "written, refused over --max-recall-drop, its figures recorded in the manifest")
    e.add_argument("--max-recall-drop", type=float, default=None, metavar="POINTS",
                   help="with --quality-data: the most percentage points any recall@k or mAP@k may fall against the "
                        f"fp32 graphs (default {DEFAULT_MAX_RECALL_DROP:g})")
    e.add_argument("--opt-batch", type=int, default=None,
                   help=f"batch size to optimize for (TensorRT profile, Triton); default opt/max: {defaults}")
    e.add_argument("--max-batch", type=int, default=None, help="largest batch the artifacts serve (default: the family's)")
    e.add_argument("--max-sequence-length", type=int, default=DEFAULT_MAX_SEQUENCE,
                   help="longest token sequence the text or language graph serves, for families whose graphs have a "
                        "sequence axis (prompt plus image tokens where images go into the sequence: docs/models.md)")
    e.add_argument("--force-fp32", action="store_true",
                   help="allow --precision fp32 for models that declare it too large (7B-class models: about 60 GB of memory)")
    e.add_argument("--format", default="auto", choices=("auto", "onnx", "tensorrt"),
                   help="auto: ONNX, plus TensorRT engines when TensorRT and a CUDA device are present; onnx: ONNX only; "
                        "tensorrt: ONNX and engines, an error where they cannot be built")
    e.add_argument("--quiet", "-q", action="store_true", help="print only the result and errors")
    _family_options(p)
    _engine_options(p)
    _triton_options(p, standalone=False)
    return p


def _int8_forms(known: dict) -> str:
    """``--int8-mode`` help: per mode, the form each family writes (or that it has none)."""
    parts = []
    for mode in int8_modes():
        forms = []
        for family in known.values():
            try:
                forms.append(f"{family.name} {family.int8_form(mode).name}")
            except BgevlError:
                continue
        parts.append(f"{mode}: {', '.join(forms) or 'no family'}")
    return "; ".join(parts)


def _family_options(p: argparse.ArgumentParser) -> None:
    """Each family's own options (``GraphExport.add_export_arguments``), in a group titled by the family;
    which dests a family added is kept on the parser for :func:`_family_option_values`."""
    dests: dict[str, list[str]] = {}
    for family in families().values():
        group = p.add_argument_group(f"{family.name} family ({', '.join(spec.key for spec in family.models)})")
        before = len(group._group_actions)
        family.add_export_arguments(group)
        dests[family.name] = [action.dest for action in group._group_actions[before:]]
        if not dests[family.name]:
            p._action_groups.remove(group)  # no options of its own: no empty section in --help
    p.set_defaults(_family_dests=dests)


def _family_option_values(args: argparse.Namespace) -> dict:
    """The values of the options of the ``--model``'s family."""
    from bgevl.core.registry import get_model_spec

    dests = args._family_dests.get(get_model_spec(args.model).family, [])
    return {dest: getattr(args, dest) for dest in dests}


def _profile_axes() -> dict[str, str]:
    """The extra dynamic axes the registered families declare, axis -> what it counts."""
    axes: dict[str, str] = {}
    for family in families().values():
        for axis, what in family.profile_axes.items():
            axes.setdefault(axis, what)
    return axes


def _engine_options(p: argparse.ArgumentParser, standalone: bool = False) -> None:
    from bgevl.graphs.engines import DEFAULT_WORKSPACE_GB

    g = p.add_argument_group("TensorRT engines")
    if standalone:  # the export's own --max-batch/--opt-batch/--max-sequence-length apply otherwise
        g.add_argument("--max-batch", type=int, default=None, help="profile max batch (unset: the manifest's)")
        g.add_argument("--opt-batch", type=int, default=None, help="profile opt batch (unset: the manifest's)")
        g.add_argument("--max-sequence-length", type=int, default=None,
                       help="profile max token sequence, of graphs with a sequence axis (unset: the manifest's)")
        g.add_argument("--min-cosine", type=float, default=None, help="override the validation threshold")
        g.add_argument("--no-validate", dest="validate", action="store_false", help="skip the engines' parity check")
    for axis, what in _profile_axes().items():  # declared by the families (GraphExport.profile_axes)
        g.add_argument(f"--max-{axis.replace('_', '-')}", type=int, default=None,  # dest max_<axis>
                       help=f"profile max {what} (unset: the manifest's)")
    g.add_argument("--workspace-gb", type=float, default=DEFAULT_WORKSPACE_GB, help="TensorRT builder workspace limit")
    g.add_argument("--timing-cache", type=Path, default=None,
                   help="timing cache file to reuse and update (default: <export>/tensorrt/timing.cache)")


def build_engines_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bgevl-export build-engines",
        description="Build, validate and register TensorRT engines for an existing export directory "
                    "(needs TensorRT and a CUDA device: pip install 'bgevl-export[tensorrt]').",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("export_dir", type=Path, help="a bgevl-export output directory (with manifest.json)")
    _engine_options(p, standalone=True)
    return p


def _engine_options_from(args, standalone: bool):
    from bgevl.graphs.engines import EngineOptions

    axis_max = {axis: getattr(args, f"max_{axis}") for axis in _profile_axes()}
    axis_max["sequence"] = args.max_sequence_length if standalone else None
    return EngineOptions(max_batch=args.max_batch, opt_batch=args.opt_batch, axis_max=axis_max,
                         workspace_gb=args.workspace_gb, timing_cache=args.timing_cache, validate=args.validate,
                         min_cosine=args.min_cosine)


def build_engines_main(argv: list[str]) -> int:
    from bgevl.graphs.engines import build_engines

    args = build_engines_parser().parse_args(argv)
    print(build_engines(args.export_dir, _engine_options_from(args, standalone=True)))
    return 0


def _triton_options(p: argparse.ArgumentParser, standalone: bool) -> None:
    from bgevl.core.preprocessing import InputLimits
    from bgevl.core.specs import DEFAULT_SERVING_NAME
    from bgevl.serving.configs import ENCODER_BACKENDS
    from bgevl.serving.repository import AUTO_BACKEND
    from bgevl.serving.repository import DEFAULT_PREPROCESS_INSTANCES

    g = p.add_argument_group("Triton model repository")
    if not standalone:
        g.add_argument("--triton-repo", type=Path, default=None, metavar="DIR",
                       help="also write a Triton model repository of the export to DIR")
    g.add_argument("--triton-backend", default="python", choices=ENCODER_BACKENDS + (AUTO_BACKEND,),
                   help="encoders as python-backend ONNX Runtime models (what the CPU server from nvidia-pytriton "
                        "serves), onnxruntime_onnx models, tensorrt_plan engines, Triton's OpenVINO backend, "
                        "python-backend OpenVINO models (python-openvino; bf16 on CPUs that have it), or auto: the "
                        "fastest form that passes the parity gate on this machine (Embedder backend='auto'), said")
    g.add_argument("--triton-openvino-precision", default="bf16", choices=("bf16", "f32"),
                   help="inference precision of OpenVINO encoders (checked against the export's probe set first)")
    g.add_argument("--triton-name", default=DEFAULT_SERVING_NAME, help="name of the entry model; the others are NAME_<part>")
    g.add_argument("--triton-instances", type=int, default=1, help="instances per model (instance_group count)")
    g.add_argument("--triton-queue-delay-us", type=int, default=2000,
                   help="dynamic batching max queue delay of each model: latency at low load against batching at high "
                        "load (README: Triton Inference Server, measured)")
    g.add_argument("--triton-preferred-batch-sizes", type=lambda t: tuple(int(v) for v in t.split(",") if v), default=None,
                   help="comma-separated preferred batch sizes of the dynamic batchers (default: the export's opt and max batch)")
    g.add_argument("--triton-preprocess-instances", type=int, default=DEFAULT_PREPROCESS_INSTANCES,
                   help="instances of the preprocess model (each a python process): a slow item holds only its own")
    limits = InputLimits()
    g.add_argument("--max-image-pixels", type=int, default=limits.max_image_pixels,
                   help="images over this many pixels (read from the file header) are refused before decoding")
    g.add_argument("--max-aspect-ratio", type=float, default=limits.max_aspect_ratio,
                   help="images with a longer side over this many times the shorter are refused before decoding")
    g.add_argument("--max-text-bytes", type=int, default=limits.max_text_bytes, help="texts over this many UTF-8 bytes are refused")
    g.add_argument("--max-jpeg-scans", type=int, default=limits.max_jpeg_scans,
                   help="JPEGs of more scans are refused before decoding (each scan of a progressive JPEG is decoded over "
                        "the whole image); 0: no limit")


def build_triton_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bgevl-export triton-repo",
        description="Package an existing export directory as a Triton model repository.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("export_dir", type=Path, help="a bgevl-export output directory (with manifest.json)")
    p.add_argument("--output", "-o", type=Path, required=True, help="repository directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty repository directory")
    _triton_options(p, standalone=True)
    return p


def _repository_options(args, output: Path, overwrite: bool):
    """The "Triton model repository" argument group as ``RepositoryOptions``."""
    from bgevl.core.preprocessing import InputLimits
    from bgevl.serving.repository import RepositoryOptions

    limits = InputLimits(max_image_pixels=args.max_image_pixels, max_aspect_ratio=args.max_aspect_ratio,
                         max_text_bytes=args.max_text_bytes, max_jpeg_scans=args.max_jpeg_scans)
    return RepositoryOptions(output, backend=args.triton_backend, name=args.triton_name, instances=args.triton_instances,
                             queue_delay_us=args.triton_queue_delay_us, overwrite=overwrite, limits=limits,
                             preprocess_instances=args.triton_preprocess_instances,
                             preferred_batch=args.triton_preferred_batch_sizes,
                             openvino_precision=args.triton_openvino_precision)


def triton_main(argv: list[str]) -> int:
    args = build_triton_parser().parse_args(argv)
    print(_repository_options(args, args.output, args.overwrite).write(args.export_dir))
    return 0


def build_check_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bgevl-export check",
        description="Check a checkpoint the way the exporter does, without exporting: config and sizes against "
                    "--model, weight files, a float32 load with no missing or unexpected tensors, tokenizer and "
                    "processor files, and the original model's fp32 embeddings of the probe set (finite, distinct).",
    )
    p.add_argument("--model", required=True, choices=list(all_models()), help="the model the checkpoint should be")
    p.add_argument("--model-path", type=Path, default=None, help="checkpoint directory (default: the hub / its local cache)")
    return p


def check_main(argv: list[str]) -> int:
    from bgevl.checkpoints import check_checkpoint, resolve_checkpoint
    from bgevl.core.registry import get_model_spec

    args = build_check_parser().parse_args(argv)
    try:
        spec = get_model_spec(args.model)
        with tempfile.TemporaryDirectory(prefix="bgevl-check-") as work:
            ckpt = resolve_checkpoint(spec, model_path=args.model_path, random_weights=False, workdir=Path(work))
            check_checkpoint(spec, ckpt.path)
    except BgevlError:
        raise
    except (OSError, RuntimeError) as exc:  # what the checks could not foresee: one line all the same
        print(f"bgevl-export check: error: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    print("checkpoint OK")
    return 0


def build_ranges_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bgevl-export ranges",
        description="Compute the calibration ranges of an export's int8 and uint8 embeddings (each dimension's "
                    "min and max over its embeddings of a calibration set) into <export>/embedding_ranges.json, which "
                    "bgevl-api (embedding_types int8/uint8) and bgevl-embed (--embedding-dtype int8/uint8) read.",
    )
    p.add_argument("export_dir", type=Path, help="a bgevl-export output directory (with manifest.json)")
    p.add_argument("--data", type=Path, default=None, metavar="DIR",
                   help="images and .txt captions of your own data (as --calibration-data; the ranges should cover "
                        "what you embed); None: the built-in synthetic set")
    p.add_argument("--size", type=int, default=256, help="images and texts of the built-in set")
    return p


def ranges_main(argv: list[str]) -> int:
    from bgevl.core.manifest import read_manifest
    from bgevl.runtime.ranges import compute_ranges

    args = build_ranges_parser().parse_args(argv)
    read_manifest(args.export_dir)  # an export, refused in one line otherwise
    print(compute_ranges(args.export_dir, args.data, args.size, log=lambda m: print(m, file=sys.stderr)))
    return 0


def build_deploy_parser() -> argparse.ArgumentParser:
    from bgevl.serving.deploy import DeployOptions

    d = DeployOptions("s3://bucket/path")
    p = argparse.ArgumentParser(
        prog="bgevl-export deploy",
        description="Write deployment files for a Triton model repository: a serving-image Dockerfile, Kubernetes "
                    "manifests (Deployment, Service, autoscaling/v2 HPA, NetworkPolicy, PodDisruptionBudget, "
                    "prometheus-adapter rule; pods pass the Pod Security Standards 'restricted' profile) and KServe "
                    "ServingRuntime + InferenceService.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--repository-uri", required=True,
                   help="where the servers read the repository: s3://BUCKET/PATH, gs://BUCKET/PATH, as://ACCOUNT/CONTAINER/PATH "
                        "or pvc://CLAIM/PATH")
    p.add_argument("--output", "-o", type=Path, required=True, help="directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace earlier deployment files in --output")
    p.add_argument("--name", default=d.name, help="the Kubernetes objects' name (a DNS-1035 label)")
    p.add_argument("--model-name", default=d.model_name, help="the repository's entry model (its --triton-name)")
    p.add_argument("--image", default=d.image, help="the serving image the manifests run (built from the Dockerfile)")
    p.add_argument("--triton-tag", default=d.triton_tag, help="NGC tritonserver image tag of the base (Python 3.12 from 25.01)")
    p.add_argument("--image-digest", default=None, metavar="sha256:...",
                   help="pin the serving image by content digest (the manifests run IMAGE@DIGEST)")
    p.add_argument("--triton-digest", default=None, metavar="sha256:...",
                   help="pin the NGC base image by content digest (FROM nvcr.io/nvidia/tritonserver:TAG@DIGEST)")
    p.add_argument("--namespace", default=d.namespace)
    p.add_argument("--replicas", type=int, default=d.replicas, help="replicas (the HPA's minimum)")
    p.add_argument("--max-replicas", type=int, default=d.max_replicas, help="the HPA's maximum")
    p.add_argument("--gpus", type=int, default=d.gpus, help="GPUs per pod (0: CPU pods)")
    p.add_argument("--cpu", default=d.cpu, help="CPU request and limit per pod")
    p.add_argument("--memory", default=d.memory, help="memory request and limit per pod")
    p.add_argument("--shm-size", default=d.shm_size, help="size of the memory-backed /dev/shm (python backend tensors)")
    p.add_argument("--queue-delay-us", type=int, default=d.queue_delay_us,
                   help="the repository's dynamic-batching delay per model (--triton-queue-delay-us), for the HPA target")
    p.add_argument("--queue-target-factor", type=float, default=d.queue_target_factor,
                   help="HPA target: queue time per request as a multiple of what batching alone costs (3 models x delay)")
    p.add_argument("--wheel", type=Path, default=None, help="bgevl-export wheel for the image (default: built from this checkout)")
    p.add_argument("--api-port", type=int, default=d.api_port,
                   help="port of the embeddings API (bgevl-api, OpenAI's /v1/embeddings) the pod runs beside Triton; the "
                        "Service exposes it as 'api'; an optional key comes from the Secret <name>-api-key (key 'key')")
    p.add_argument("--no-api", action="store_true", help="no embeddings API container: clients speak Triton's protocol")
    return p


def deploy_main(argv: list[str]) -> int:
    from bgevl.serving.deploy import DeployOptions, client_endpoint, write_deployment

    args = build_deploy_parser().parse_args(argv)
    opts = DeployOptions(args.repository_uri, name=args.name, model_name=args.model_name, image=args.image, triton_tag=args.triton_tag,
                         namespace=args.namespace, replicas=args.replicas, max_replicas=args.max_replicas, gpus=args.gpus,
                         cpu=args.cpu, memory=args.memory, shm_size=args.shm_size, queue_delay_us=args.queue_delay_us,
                         queue_target_factor=args.queue_target_factor, api=not args.no_api, api_port=args.api_port,
                         image_digest=args.image_digest, triton_digest=args.triton_digest)
    print(write_deployment(args.output, opts, wheel=args.wheel, overwrite=args.overwrite, sink=lambda m: None))
    print(client_endpoint(opts))
    return 0


SUBCOMMANDS = {"triton-repo": triton_main, "build-engines": build_engines_main, "check": check_main,
               "ranges": ranges_main, "deploy": deploy_main}


#: The subcommands: what each does and one example (``bgevl-export --help`` and ``bgevl-export COMMAND --help``).
COMMANDS = {
    "export": ("export a model to validated ONNX graphs (the default command: `bgevl-export OPTIONS` is "
               "`bgevl-export export OPTIONS`), optionally with TensorRT engines and a Triton repository",
               "bgevl-export export --model large --precision fp16 --output out/large-fp16 --triton-repo out/repo",
               build_parser),
    "check": ("check a checkpoint the way the exporter does, without exporting",
              "bgevl-export check --model base --model-path ./BGE-VL-base", build_check_parser),
    "triton-repo": ("package an export as a Triton model repository",
                    "bgevl-export triton-repo out/large-fp16 --output out/repo --triton-backend python",
                    build_triton_parser),
    "build-engines": ("build, validate and register TensorRT engines of an export (on a GPU machine)",
                      "bgevl-export build-engines out/large-fp16 --workspace-gb 8", build_engines_parser),
    "ranges": ("compute the calibration ranges of an export's int8/uint8 embeddings (for bgevl-api and bgevl-embed)",
               "bgevl-export ranges out/large-fp16 --data ./my-images-and-captions", build_ranges_parser),
    "deploy": ("write a serving image, Kubernetes and KServe manifests for a repository in object storage",
               "bgevl-export deploy --repository-uri s3://bucket/bgevl/repo --output deploy/", build_deploy_parser),
}


def build_tool_parser() -> argparse.ArgumentParser:
    """The whole tool for ``--help``: the export options of the bare form, and every subcommand with its
    options (the parsers each subcommand runs), what it does and an example."""
    p = build_parser()
    p.description = ("Export BGE-VL models to validated ONNX graphs and TensorRT engines, package them for Triton, "
                     "and deploy them. `bgevl-export COMMAND --help` shows a command's options.")
    p.epilog = "examples:\n" + "\n".join(f"  {example}" for _, example, _ in COMMANDS.values())
    p.formatter_class = _HelpFormatter
    commands = p.add_subparsers(title="commands", metavar="COMMAND", dest="command", prog="bgevl-export")
    for name, (summary, example, builder) in COMMANDS.items():
        parent = builder()
        commands.add_parser(name, parents=[parent], conflict_handler="resolve", help=summary,
                            description=parent.description or summary,
                            epilog=f"example:\n  {example}", formatter_class=_HelpFormatter)
    # the commands first, then the export options (argparse lists groups in the order they were made)
    p._action_groups.insert(1, p._action_groups.pop())
    p.usage = "bgevl-export [COMMAND] [OPTIONS]   (no COMMAND: export)"
    return p


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, examples kept on their own lines."""


def _inferred_model(model_path: Path | None, quiet: bool) -> str:
    """``--model`` when not given: read from ``--model-path`` (``bgevl.checkpoints.infer_model_specs``), else tiny."""
    if model_path is None:
        return "tiny"
    from bgevl.checkpoints import infer_model_specs

    spec, *others = infer_model_specs(model_path)
    if not quiet:
        also = (f"; its architecture is also {', '.join(o.key for o in others)}'s (the same export): pass --model to "
                f"record another") if others else ""
        print(f"--model {spec.key} ({spec.hub_id or spec.description.split(',')[0]}): read from {model_path}{also}",
              file=sys.stderr)
    return spec.key


def _asks_for_help(argv: list[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


def main(argv: list[str] | None = None) -> int:
    """``bgevl-export [export] [options]`` exports; ``bgevl-export COMMAND ...`` runs a subcommand
    (:data:`COMMANDS`); ``--help`` shows the whole tool, ``COMMAND --help`` one command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        build_tool_parser().print_help()
        return 0
    if argv and argv[0] in COMMANDS and _asks_for_help(argv[1:]):
        build_tool_parser().parse_args([argv[0], "--help"])  # the command's options, what it does, an example
    if argv and argv[0] == "export":
        argv = argv[1:]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] in SUBCOMMANDS:  # SIGTERM cleans up like Ctrl-C: staging and temporary directories go
        command, rest = argv[0], argv[1:]
        return run_cli(f"bgevl-export {command}", lambda: SUBCOMMANDS[command](rest))
    args = build_parser().parse_args(argv)
    return run_cli("bgevl-export", lambda: _in_private_tmp(lambda: _export(args, argv)), "interrupted; nothing was written",
                   os_errors="nothing was written")  # a full disk, a folder that became unwritable


def _in_private_tmp(body: Callable[[], int]) -> int:
    """``body()`` with the process's temporary files in a folder of its own, removed at the end, an interrupt
    included: what the libraries make there (torch's exporter and its caches make folders under TMPDIR that
    an interrupt at the wrong moment left behind) goes with it. The command line's process is this run alone."""
    with tempfile.TemporaryDirectory(prefix="bgevl-export-tmp-") as private:
        tempfile.tempdir = private
        try:
            return body()
        finally:
            tempfile.tempdir = None


def _export(args: argparse.Namespace, argv: list[str]) -> int:
    from bgevl.export.driver import ExportOptions, build_artifacts

    if args.model is None:
        args.model = _inferred_model(args.model_path, args.quiet)

    output = args.output or Path("out") / f"{args.model}-{args.precision}"
    opts = ExportOptions(
        output=output, model=args.model, model_path=args.model_path, random_weights=args.random_weights,
        precision=args.precision, int8_mode=args.int8_mode, calibration_data=args.calibration_data,
        calibration_size=args.calibration_size, validate=args.validate, min_cosine=args.min_cosine,
        opt_batch=args.opt_batch, max_batch=args.max_batch, overwrite=args.overwrite,
        max_sequence_length=args.max_sequence_length, force_fp32=args.force_fp32,
        command=shlex.join(["bgevl-export", *argv]), quality_data=args.quality_data,
        max_recall_drop=args.max_recall_drop, family_options=_family_option_values(args),
    )
    repository = _repository_options(args, args.triton_repo, args.overwrite) if args.triton_repo is not None else None
    out = build_artifacts(opts, format=args.format, engines=_engine_options_from(args, standalone=False),
                          repository=repository, quiet=args.quiet)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
