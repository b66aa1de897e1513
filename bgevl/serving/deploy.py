"""Deployment files for a Triton model repository beyond one machine (``bgevl-export deploy``).

Written into one directory, every value a parameter (:class:`DeployOptions`):

* ``Dockerfile`` + ``requirements.txt``: a serving image on an NGC ``tritonserver:<tag>-py3`` base
  whose Python (3.12 from 25.01 on) the pinned dependency set resolves on (24.10, the Triton of the
  tested bundled server, has Python 3.10, where ``pillow`` and ``onnxruntime`` of ``constraints.txt``
  have no wheels), with this package installed and a non-root user;
* ``k8s/``: a Deployment (GPU requests, a startup probe on Triton's readiness, readiness and liveness
  exec probes that also fail on a dead python-backend stub (``bgevl.serving.probe``), a memory-backed ``/dev/shm`` for the python backend, the restricted admin APIs keyed by
  a Secret), a Service, an ``autoscaling/v2`` HPA on queue time per request through
  prometheus-adapter, and that adapter's rule;
* ``kserve/``: a ServingRuntime with this image and an InferenceService, the KServe alternative
  (KServe's own Triton runtime is ``tritonserver:23.05-py3`` without this package).

The repository is read from object storage (``s3://``, ``gs://``, ``as://``: Triton's own
clients, credentials from the Secret ``<name>-storage``) or from a volume (``pvc://CLAIM/PATH``).
"""

from __future__ import annotations

import importlib.metadata as md
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bgevl import __version__
from bgevl.core.errors import BgevlError

#: NGC Triton image tag and the Python it ships (NGC framework support matrix: 25.01 and later
#: are Ubuntu 24.04 with Python 3.12).
DEFAULT_TRITON_TAG = "25.10-py3"
IMAGE_PYTHON = "3.12"
#: The NGC images' non-root user (uid 1000).
IMAGE_USER = "triton-server"
IMAGE_UID = 1000

#: Models in the chain of one request (preprocess, encoder, entry): each adds its batching delay.
CHAIN_MODELS = 3
#: Triton's --exit-timeout-secs, and the pod's termination grace: longer, so that the kubelet does not
#: kill the server while it drains (Kubernetes' default grace, 30 s, equalled Triton's default timeout).
EXIT_TIMEOUT_S = 30
TERMINATION_GRACE_S = EXIT_TIMEOUT_S + 15
#: The image's entrypoint: tritonserver with its admin APIs (model repository, shared memory, logging,
#: trace) restricted behind a random key made at each start and kept nowhere, that is, off. Triton takes
#: the key only on its command line, so a key from a Secret would show in the process list (`ps`) of the
#: node and the pod; nothing in the pod needs those APIs (the models load at start, --load-model=*).
ENTRYPOINT = "/opt/bgevl/serve.sh"
DIGEST = r"sha256:[0-9a-f]{64}"


@dataclass
class DeployOptions:
    repository_uri: str  # s3://bucket/path, gs://bucket/path, pvc://claim/path
    name: str = "bgevl"  # the Kubernetes objects' name
    model_name: str = "bgevl"  # the repository's entry model (--triton-name), for the HPA's query
    image: str = f"bgevl-triton:{__version__}"
    triton_tag: str = DEFAULT_TRITON_TAG
    namespace: str = "default"
    replicas: int = 1
    max_replicas: int = 4
    gpus: int = 1
    cpu: str = "4"
    memory: str = "16Gi"
    shm_size: str = "2Gi"
    queue_delay_us: int = 2000  # the repository's dynamic-batching delay per model
    #: HPA target: average queue time per request, as a multiple of what batching alone costs at low
    #: load (CHAIN_MODELS x queue_delay_us)
    queue_target_factor: float = 4.0
    #: the embeddings API (bgevl-api, OpenAI's /v1/embeddings) in a second container of the pod, forwarding
    #: to Triton over gRPC on localhost; clients use its Service port
    api: bool = True
    api_port: int = 8080
    #: content digests (sha256:...) that pin the serving image and the NGC base image beyond their tags
    image_digest: str | None = None
    triton_digest: str | None = None

    @property
    def image_ref(self) -> str:
        return f"{self.image}@{self.image_digest}" if self.image_digest else self.image

    @property
    def pull_policy(self) -> str:
        """A tag can move, so it is pulled at every start; a digest cannot."""
        return "IfNotPresent" if self.image_digest else "Always"

    @property
    def base_image(self) -> str:
        base = f"nvcr.io/nvidia/tritonserver:{self.triton_tag}"
        return f"{base}@{self.triton_digest}" if self.triton_digest else base

    @property
    def object_storage(self) -> bool:
        return not self.repository_uri.startswith("pvc://")

    @property
    def queue_target_us(self) -> int:
        return int(self.queue_target_factor * CHAIN_MODELS * self.queue_delay_us)


def check_options(opts: DeployOptions) -> None:
    if not re.fullmatch(r"(s3|gs|as|pvc)://\S+", opts.repository_uri):
        raise BgevlError(f"--repository-uri {opts.repository_uri!r}: use s3://BUCKET/PATH, gs://BUCKET/PATH, "
                         f"as://ACCOUNT/CONTAINER/PATH or pvc://CLAIM/PATH (a PersistentVolumeClaim holding the repository)")
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", opts.name):
        raise BgevlError(f"--name {opts.name!r}: a Kubernetes Service name (DNS-1035 label): lower-case letters, digits "
                         f"and '-', starting with a letter, at most 63 characters")
    if not 1 <= opts.replicas <= opts.max_replicas:
        raise BgevlError(f"need 1 <= --replicas <= --max-replicas, got {opts.replicas} and {opts.max_replicas}")
    if opts.gpus < 0:
        raise BgevlError("--gpus must be 0 or more")
    if opts.api and (not 1 <= opts.api_port <= 65535 or opts.api_port in (8000, 8001, 8002)):
        raise BgevlError(f"--api-port {opts.api_port}: use a free port from 1 to 65535 other than Triton's 8000-8002")
    # every value written into the Dockerfile and the manifests, by its own grammar: a newline in one would
    # add a line of the user's choosing (a RUN in the Dockerfile, a field in a manifest)
    grammars = (
        ("--triton-tag", opts.triton_tag, r"[\w][\w.-]{0,127}", "a Docker tag: letters, digits, '_', '.', '-'"),
        ("--image", opts.image, r"[a-z0-9]+([._-]+[a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-]+[a-z0-9]+)*)*(:[\w][\w.-]{0,127})?",
         "a Docker image reference: [registry/]name[:tag] in lower case"),
        ("--namespace", opts.namespace, r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", "a Kubernetes namespace (DNS-1123 label)"),
        ("--model-name", opts.model_name, r"[A-Za-z0-9_.-]{1,128}", "a Triton model name: letters, digits, '_', '.', '-'"),
        ("--cpu", opts.cpu, r"[0-9]+(\.[0-9]+)?m?", "a Kubernetes CPU quantity (4, 500m)"),
        ("--memory", opts.memory, r"[0-9]+(\.[0-9]+)?([KMGTPE]i?)?", "a Kubernetes memory quantity (16Gi)"),
        ("--shm-size", opts.shm_size, r"[0-9]+(\.[0-9]+)?([KMGTPE]i?)?", "a Kubernetes memory quantity (2Gi)"),
    )
    for flag, value, grammar, what in grammars:
        if not re.fullmatch(grammar, str(value)):
            raise BgevlError(f"{flag} {value!r}: not {what}")
    for flag, digest in (("--image-digest", opts.image_digest), ("--triton-digest", opts.triton_digest)):
        if digest is not None and not re.fullmatch(DIGEST, digest):
            raise BgevlError(f"{flag} {digest!r}: give the content digest as sha256: and 64 hex digits "
                             f"(docker buildx imagetools inspect IMAGE shows it)")


# --- the image ---------------------------------------------------------------------------------

def pinned_requirements(extras: tuple[str, ...] = ("cpu",), python: str = IMAGE_PYTHON) -> list[str]:
    """``name==version`` for this package's runtime dependencies (with ``extras``) and everything they
    need, at the versions installed here (``constraints.txt``'s), for a Linux ``python``."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    env: dict[str, Any] = {**default_environment(), "python_version": python, "python_full_version": f"{python}.0",
           "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix"}
    seen: dict[str, str] = {}

    def visit(dist_name: str, extras: tuple[str, ...]) -> None:
        dist = md.distribution(dist_name)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not any(req.marker.evaluate({**env, "extra": e}) for e in ("", *extras)):
                continue
            key = req.name.lower().replace("_", "-")
            if key in seen:
                continue
            try:
                seen[key] = md.version(req.name)
            except md.PackageNotFoundError:
                raise BgevlError(f"{req.name} (needed by {dist_name}) is not installed here, so its version cannot be "
                                 f"pinned; install bgevl-export[{','.join(extras) or 'cpu'}] first") from None
            visit(req.name, tuple(req.extras))

    visit("bgevl-export", extras)
    seen.pop("bgevl-export", None)
    return [f"{name}=={version}" for name, version in sorted(seen.items())]


def dockerfile(opts: DeployOptions, wheel_name: str) -> str:
    return f"""\
# Triton serving image for a bgevl-export model repository (generated by bgevl-export {__version__}).
# Build beside this file:  docker build -t {opts.image} .
# Base: NGC Triton {opts.triton_tag} (Python {IMAGE_PYTHON}: the pinned requirements resolve there; the
# python backend's stub embeds this Python, so the packages go into it).
FROM {opts.base_image}

# Ubuntu 24.04 marks its Python externally managed (PEP 668); this image is a single-purpose
# server, so the models' dependencies go into that Python, pinned.
ENV PIP_BREAK_SYSTEM_PACKAGES=1 \\
    PIP_NO_CACHE_DIR=1 \\
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY requirements.txt {wheel_name} serve.sh /opt/bgevl/
RUN python3 -m pip install --no-cache-dir --requirement /opt/bgevl/requirements.txt \\
    && python3 -m pip install --no-cache-dir --no-deps /opt/bgevl/{wheel_name} \\
    && chmod 0555 {ENTRYPOINT}

USER {IMAGE_UID}
EXPOSE 8000 8001 8002{f" {opts.api_port}" if opts.api else ""}
# tritonserver with its admin APIs off (serve.sh); arguments are tritonserver's
ENTRYPOINT ["{ENTRYPOINT}"]
CMD ["--model-repository=/models"]
"""


def serve_script() -> str:
    """The image's entrypoint (:data:`ENTRYPOINT`): ``tritonserver "$@"`` with the admin APIs restricted behind
    a key made from ``/dev/urandom`` at each start and never stored or printed."""
    from bgevl.serving.server import ADMIN_HEADER, RESTRICTED_APIS

    apis = ",".join(RESTRICTED_APIS)
    return f"""\
#!/bin/sh
# tritonserver with its admin APIs ({apis}) off: restricted behind a random key made here at
# each start and kept nowhere (generated by bgevl-export {__version__}). Arguments are tritonserver's.
set -eu
key=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \\n')
exec tritonserver "$@" --http-restricted-api="{apis}:{ADMIN_HEADER}=$key" \\
    --grpc-restricted-protocol="{apis}:{ADMIN_HEADER}=$key"
"""


# --- Kubernetes --------------------------------------------------------------------------------

def _labels(opts: DeployOptions) -> dict[str, str]:
    return {"app.kubernetes.io/name": opts.name, "app.kubernetes.io/component": "triton",
            "app.kubernetes.io/managed-by": "bgevl-export"}


#: Writable places of a container whose root filesystem is read-only: /tmp (an emptyDir), also HOME.
_TMP_MOUNT = {"name": "tmp", "mountPath": "/tmp"}
_TMP_ENV = [{"name": "TMPDIR", "value": "/tmp"}, {"name": "HOME", "value": "/tmp"}]


def container_security() -> dict:
    """Each container: Pod Security Standards "restricted" (no privilege escalation, every capability
    dropped, non-root) and a read-only root filesystem."""
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": True,
            "runAsNonRoot": True, "runAsUser": IMAGE_UID, "runAsGroup": IMAGE_UID}


def pod_security() -> dict:
    return {"runAsNonRoot": True, "runAsUser": IMAGE_UID, "runAsGroup": IMAGE_UID, "fsGroup": IMAGE_UID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _repository(opts: DeployOptions) -> tuple[str, list[dict], list[dict]]:
    """The --model-repository value, and the volumes / mounts a pvc:// repository needs."""
    if opts.repository_uri.startswith("pvc://"):
        claim, _, sub = opts.repository_uri[len("pvc://"):].partition("/")
        volume = {"name": "model-repository", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        mount = {"name": "model-repository", "mountPath": "/models", "readOnly": True}
        return f"/models/{sub}".rstrip("/"), [volume], [mount]
    return opts.repository_uri, [], []


def _resources(opts: DeployOptions) -> dict:
    limits: dict[str, Any] = {"cpu": opts.cpu, "memory": opts.memory}
    if opts.gpus:
        limits["nvidia.com/gpu"] = opts.gpus
    return {"requests": {"cpu": opts.cpu, "memory": opts.memory, **({"nvidia.com/gpu": opts.gpus} if opts.gpus else {})},
            "limits": limits}


def deployment(opts: DeployOptions) -> dict:
    repository, volumes, mounts = _repository(opts)
    probe = lambda path, period, failures: {  # noqa: E731
        "httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "failureThreshold": failures, "timeoutSeconds": 5}
    container = {
        "name": "tritonserver",
        "image": opts.image_ref,  # its entrypoint serve.sh runs tritonserver with the admin APIs off
        "imagePullPolicy": opts.pull_policy,
        "args": [f"--model-repository={repository}", "--model-control-mode=explicit", "--load-model=*",
                 "--http-port=8000", "--grpc-port=8001", "--metrics-port=8002", "--allow-metrics=true",
                 f"--exit-timeout-secs={EXIT_TIMEOUT_S}"],
        "ports": [{"name": "http", "containerPort": 8000}, {"name": "grpc", "containerPort": 8001},
                  {"name": "metrics", "containerPort": 8002}],
        "env": list(_TMP_ENV),
        "resources": _resources(opts),
        "startupProbe": probe("/v2/health/ready", 10, 60),  # large repositories take minutes to load
        # Triton's health endpoints stay 200 with a dead python-backend stub: the exec probe also fails on one
        # (bgevl.serving.probe), so the pod leaves the Service at once and the container restarts ~30 s later
        "readinessProbe": stub_probe(ready=True, period=5, failures=3),
        "livenessProbe": stub_probe(ready=False, period=10, failures=3),
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, _TMP_MOUNT, *mounts],
        "securityContext": container_security(),
    }
    if opts.object_storage:  # required: missing credentials stop the pod at start, not the repository's load later
        container["envFrom"] = [{"secretRef": {"name": f"{opts.name}-storage", "optional": False}}]
    pod: dict[str, Any] = {
        "containers": [container],
        # the python backend passes tensors through /dev/shm; Docker's and Kubernetes' default is 64 MB
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": opts.shm_size}},
                    {"name": "tmp", "emptyDir": {}}, *volumes],
        "securityContext": pod_security(),
        "automountServiceAccountToken": False,  # nothing in the pod talks to the Kubernetes API
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
    }
    if opts.api:
        pod["containers"].append(api_container(opts))
    if opts.gpus:
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    labels = _labels(opts)
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": opts.name, "namespace": opts.namespace, "labels": labels},
        "spec": {
            "replicas": opts.replicas,
            "selector": {"matchLabels": {"app.kubernetes.io/name": opts.name}},
            "template": {
                "metadata": {"labels": labels, "annotations": {
                    "prometheus.io/scrape": "true", "prometheus.io/port": "8002", "prometheus.io/path": "/metrics"}},
                "spec": pod,
            },
        },
    }


#: The exec probe of the tritonserver container (bgevl.serving.probe): Triton live (--ready: and ready) and no
#: python-backend stub dead since an earlier probe; its state between probes in the /tmp emptyDir.
PROBE_COMMAND = ["python3", "-m", "bgevl.serving.probe"]


def stub_probe(ready: bool, period: int, failures: int) -> dict:
    return {"exec": {"command": PROBE_COMMAND + (["--ready"] if ready else [])}, "periodSeconds": period,
            "failureThreshold": failures, "timeoutSeconds": 5}


API_KEY_ENV = "BGEVL_API_KEY"


def api_container(opts: DeployOptions) -> dict:
    """``bgevl-api`` beside Triton in the pod: forwards to ``localhost:8001`` (gRPC), probes on its own health
    routes (ready only when Triton's entry model is), an optional key from the Secret ``<name>-api-key``."""
    probe = lambda path, period, failures: {  # noqa: E731
        "httpGet": {"path": path, "port": "api"}, "periodSeconds": period, "failureThreshold": failures, "timeoutSeconds": 5}
    return {
        "name": "embeddings-api",
        "image": opts.image_ref,
        "imagePullPolicy": opts.pull_policy,
        "command": ["bgevl-api"],
        "args": ["--triton-url=localhost:8001", f"--triton-model={opts.model_name}", "--host=0.0.0.0",
                 f"--port={opts.api_port}"],
        "ports": [{"name": "api", "containerPort": opts.api_port}],
        "env": [{"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": f"{opts.name}-api-key", "key": "key",
                                                                     "optional": True}}}, *_TMP_ENV],
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "2Gi"}},
        "startupProbe": probe("/health/ready", 10, 60),
        "readinessProbe": probe("/health/ready", 5, 3),
        "livenessProbe": probe("/health/live", 10, 3),
        "volumeMounts": [_TMP_MOUNT],
        "securityContext": container_security(),
    }


def service(opts: DeployOptions) -> dict:
    ports = [{"name": "http", "port": 8000, "targetPort": "http"}, {"name": "grpc", "port": 8001, "targetPort": "grpc"},
             {"name": "metrics", "port": 8002, "targetPort": "metrics"}]
    if opts.api:
        ports.append({"name": "api", "port": opts.api_port, "targetPort": "api"})
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": opts.name, "namespace": opts.namespace, "labels": _labels(opts)},
        "spec": {"selector": {"app.kubernetes.io/name": opts.name}, "ports": ports},
    }


def network_policy(opts: DeployOptions) -> dict:
    """Ingress to the pods: the client ports (the API, Triton's HTTP and gRPC) from pods of the same namespace,
    metrics from any namespace (Prometheus usually runs in its own); nothing else. Edit ``from`` for clients
    in other namespaces."""
    clients = [{"port": name} for name in (["api"] if opts.api else []) + ["http", "grpc"]]
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": opts.name, "namespace": opts.namespace, "labels": _labels(opts)},
        "spec": {
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": opts.name}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {}}], "ports": clients},
                        {"from": [{"namespaceSelector": {}}], "ports": [{"port": "metrics"}]}],
        },
    }


def disruption_budget(opts: DeployOptions) -> dict:
    """At most one pod down at a time in voluntary disruptions (node drains, upgrades); ``maxUnavailable``
    rather than ``minAvailable``, which with one replica would block every drain."""
    return {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": opts.name, "namespace": opts.namespace, "labels": _labels(opts)},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app.kubernetes.io/name": opts.name}}},
    }


def client_endpoint(opts: DeployOptions) -> str:
    """What clients use, in one line."""
    host = f"{opts.name}.{opts.namespace}.svc"
    if opts.api:
        return (f"clients: OpenAI's embeddings API at http://{host}:{opts.api_port}/v1/embeddings (Service port "
                f"{opts.api_port}, 'api'); Triton's own HTTP/gRPC at {host}:8000 / {host}:8001")
    return f"clients: Triton HTTP/gRPC at {host}:8000 / {host}:8001 (no embeddings API: --no-api)"


def queue_metric(opts: DeployOptions) -> str:
    """The per-pod metric prometheus-adapter serves to this deployment's HPA (one per deployment)."""
    return f"{opts.name.replace('-', '_')}_queue_us_per_request"


def hpa(opts: DeployOptions) -> dict:
    """``autoscaling/v2`` (``v2beta2``, which Triton's own chart still uses, was removed in Kubernetes
    1.26) on the average queue time per request of each pod. Triton's chart targets 50 us of
    ``nv_inference_queue_duration_us``; with a batching delay of ``queue_delay_us`` in each of the
    chain's models, an idle pod already queues about ``CHAIN_MODELS x queue_delay_us`` per request,
    so such a target would hold the HPA at its maximum. The target here is ``queue_target_factor``
    times that baseline."""
    return {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": opts.name, "namespace": opts.namespace, "labels": _labels(opts)},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": opts.name},
            "minReplicas": opts.replicas, "maxReplicas": opts.max_replicas,
            "metrics": [{"type": "Pods", "pods": {"metric": {"name": queue_metric(opts)},
                                                   "target": {"type": "AverageValue", "averageValue": str(opts.queue_target_us)}}}],
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}},
        },
    }


def adapter_rule(opts: DeployOptions) -> dict:
    """The prometheus-adapter rule (to merge) the HPA needs: queue microseconds of every model of the pod per
    request of the entry model, over one minute. A fragment to merge into the adapter's rules (its
    Helm chart's ``rules.custom``, or the ``rules:`` list of its ConfigMap), not a ConfigMap of its
    own: applying one would replace every rule the adapter already serves."""
    query = (f"sum(rate(nv_inference_queue_duration_us{{<<.LabelMatchers>>}}[1m])) by (<<.GroupBy>>) / "
             f"clamp_min(sum(rate(nv_inference_request_success{{<<.LabelMatchers>>,model=\"{opts.model_name}\"}}[1m])) "
             f"by (<<.GroupBy>>), 0.001)")
    return {
        "seriesQuery": f'nv_inference_queue_duration_us{{namespace="{opts.namespace}",pod=~"{opts.name}-.*"}}',
        "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
        "name": {"matches": "^nv_inference_queue_duration_us$", "as": queue_metric(opts)},
        "metricsQuery": query,
    }


# --- KServe ------------------------------------------------------------------------------------

def serving_runtime(opts: DeployOptions) -> dict:
    return {
        "apiVersion": "serving.kserve.io/v1alpha1", "kind": "ServingRuntime",
        "metadata": {"name": f"{opts.name}-triton", "namespace": opts.namespace, "labels": _labels(opts)},
        "spec": {
            "supportedModelFormats": [{"name": "triton", "version": "2", "autoSelect": False}],
            "protocolVersions": ["v2", "grpc-v2"],
            "containers": [{
                "name": "kserve-container", "image": opts.image_ref,
                "command": [ENTRYPOINT],  # tritonserver with the admin APIs off
                "args": ["--model-store=/mnt/models", "--model-control-mode=explicit", "--load-model=*",
                         "--http-port=8080", "--grpc-port=9000", "--allow-metrics=true",
                         f"--exit-timeout-secs={EXIT_TIMEOUT_S}"],
                "env": list(_TMP_ENV),
                # 8080 HTTP; 9000 gRPC, named h2c as KServe expects of a gRPC port
                "ports": [{"containerPort": 8080, "protocol": "TCP"}, {"name": "h2c", "containerPort": 9000, "protocol": "TCP"}],
                "resources": _resources(opts),
                "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, _TMP_MOUNT],
                "securityContext": container_security(),
            }],
            "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": opts.shm_size}},
                        {"name": "tmp", "emptyDir": {}}],
        },
    }


def inference_service(opts: DeployOptions) -> dict:
    return {
        "apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
        "metadata": {"name": opts.name, "namespace": opts.namespace, "labels": _labels(opts)},
        "spec": {"predictor": {
            "minReplicas": opts.replicas, "maxReplicas": opts.max_replicas,
            "model": {"modelFormat": {"name": "triton"}, "runtime": f"{opts.name}-triton",
                      "storageUri": opts.repository_uri,  # KServe's storage initializer reads s3://, gs://, pvc:// itself
                      "resources": _resources(opts)},
        }},
    }


# --- writing -----------------------------------------------------------------------------------

def _yaml(*documents: dict) -> str:
    import yaml

    return "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in documents)


def write_deployment(output: Path, opts: DeployOptions, wheel: Path | None = None, overwrite: bool = False,
                     sink=print) -> Path:
    """Write the deployment files to ``output``; ``wheel``: this package's wheel to copy beside the
    Dockerfile (``pip wheel --no-deps . -w DIR``), else built from the source checkout."""
    from bgevl.core.staging import check_replaceable, staged_directory

    check_options(opts)
    output = Path(output).expanduser().resolve()
    what = "bgevl deployment files (deploy.json)"
    check_replaceable(output, overwrite, _is_deployment, what, "--output")
    with staged_directory(output, overwrite=overwrite, is_ours=_is_deployment, what=what) as staging:
        wheel = wheel or build_wheel(staging)
        if wheel.parent != staging:
            (staging / wheel.name).write_bytes(wheel.read_bytes())
        extras = ("cpu", "api") if opts.api else ("cpu",)
        (staging / "requirements.txt").write_text(
            f"# runtime dependencies of bgevl-export[{','.join(extras)}] {__version__}, pinned (constraints.txt), for "
            f"Python {IMAGE_PYTHON}\n" + "\n".join(pinned_requirements(extras)) + "\n")
        (staging / "Dockerfile").write_text(dockerfile(opts, wheel.name))
        (staging / "serve.sh").write_text(serve_script())
        (staging / "serve.sh").chmod(0o755)
        (staging / "k8s").mkdir()
        (staging / "k8s" / "deployment.yaml").write_text(_yaml(deployment(opts)))
        (staging / "k8s" / "service.yaml").write_text(_yaml(service(opts)))
        (staging / "k8s" / "hpa.yaml").write_text(_yaml(hpa(opts)))
        (staging / "k8s" / "networkpolicy.yaml").write_text(_yaml(network_policy(opts)))
        (staging / "k8s" / "poddisruptionbudget.yaml").write_text(_yaml(disruption_budget(opts)))
        (staging / "prometheus-adapter").mkdir()
        (staging / "prometheus-adapter" / "rules.yaml").write_text(
            "# Merge into prometheus-adapter's rules (Helm: rules.custom; or the rules: list of its ConfigMap).\n"
            + _yaml({"rules": [adapter_rule(opts)]}))
        (staging / "kserve").mkdir()
        (staging / "kserve" / "servingruntime.yaml").write_text(_yaml(serving_runtime(opts)))
        (staging / "kserve" / "inferenceservice.yaml").write_text(_yaml(inference_service(opts)))
        (staging / "deploy.json").write_text(json.dumps(
            {"bgevl-export": __version__, **vars(opts), "queue_target_us": opts.queue_target_us}, indent=2) + "\n")
    sink(f"wrote deployment files for {opts.repository_uri} to {output}")
    return output


def _is_deployment(directory: Path) -> bool:
    try:
        return "bgevl-export" in json.loads((directory / "deploy.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def build_wheel(directory: Path) -> Path:
    """This package's wheel, built from the source checkout it is installed from (editable install)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise BgevlError("bgevl-export is not installed from a source checkout, so its wheel cannot be built here; "
                         "pass --wheel PATH (pip wheel --no-deps bgevl-export -w DIR)")
    build_dir_existed = (root / "build").exists()
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(directory), str(root)], capture_output=True, text=True)
    if not build_dir_existed:  # setuptools builds in the checkout; leave it as it was
        import shutil

        shutil.rmtree(root / "build", ignore_errors=True)
    wheels = sorted(directory.glob("bgevl_export-*.whl"))
    if result.returncode != 0 or not wheels:
        raise BgevlError(f"building the bgevl-export wheel failed: {result.stderr.strip().splitlines()[-1:] or result.returncode}")
    return wheels[-1]
