"""Kubernetes manifests: every kustomization renders with `kubectl kustomize`, every rendered resource passes
`kubernetes-validate --strict` (bundled OpenAPI schemas, no cluster needed), and the pieces fit together
(selectors, probes, Prometheus scrape annotations, resources, RBAC for the ZenML orchestrator, GPU scheduling,
settings the server reads)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is a dev dependency (pip install -e '.[dev]')"
)

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
KUSTOMIZATIONS = ["base", "overlays/cpu", "overlays/gpu"]
# Kubernetes versions the manifests must be valid for (schemas ship with kubernetes-validate).
VERSIONS = ["1.34.0", "1.37.0"]
# GET routes the serving app declares (read from its source, so this test needs no model stack imported).
APP_GET_ROUTES = set(re.findall(r'@app\.get\("([^"]+)"', (REPO / "deploy" / "app.py").read_text()))


def _kubectl() -> str | None:
    exe = shutil.which("kubectl")
    if exe is None:
        return None
    probe = subprocess.run([exe, "kustomize", "--help"], capture_output=True, text=True)
    return exe if probe.returncode == 0 else None


KUBECTL = _kubectl()
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None,
    reason="kubectl (with built-in kustomize) is not installed: install kubectl (Debian: apt-get install kubectl "
    "from the "
    "Kubernetes apt repository) to render the overlays; the raw base files are still schema-validated below",
)


def render(path: str) -> list[dict]:
    out = subprocess.run([KUBECTL, "kustomize", str(K8S / path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {k: render(k) for k in KUSTOMIZATIONS}


def by_kind(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def validate_strict(doc: dict, where: str) -> None:
    for version in VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            path = ".".join(str(p) for p in err.path)
            pytest.fail(
                f"{where}: {doc['kind']}/{doc['metadata'].get('name')} invalid for Kubernetes {version} at {path}: "
                f"{err.message}"
            )


def test_base_files_validate_strict():
    """Each base file is a complete resource; this check needs no kubectl."""
    files = sorted(p for p in (K8S / "base").glob("*.yaml") if p.name != "kustomization.yaml")
    assert files
    for f in files:
        for doc in yaml.safe_load_all(f.read_text()):
            if doc:
                validate_strict(doc, str(f.relative_to(REPO)))


@needs_kubectl
def test_every_rendered_manifest_validates_strict(rendered):
    for name, docs in rendered.items():
        kinds = {d["kind"] for d in docs}
        assert {
            "Namespace",
            "ServiceAccount",
            "Role",
            "RoleBinding",
            "ConfigMap",
            "PersistentVolumeClaim",
            "Deployment",
            "Service",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
        } <= kinds, name
        for doc in docs:
            assert doc["metadata"].get("namespace", "tapper") == "tapper" or doc["kind"] == "Namespace", doc["metadata"]
            validate_strict(doc, name)


@needs_kubectl
def test_serving_pieces_fit_together(rendered):
    for name, docs in rendered.items():
        dep = by_kind(docs, "Deployment", "tapper-serve")
        pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        svc = by_kind(docs, "Service", "tapper-serve")
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        pdb = by_kind(docs, "PodDisruptionBudget")
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        hpa = by_kind(docs, "HorizontalPodAutoscaler")
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "tapper-serve"}
        assert "replicas" not in dep["spec"]  # the HPA owns the replica count
        pod = dep["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert svc["spec"]["ports"][0]["targetPort"] == "http" and ports["http"] == 8080
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, (name, probe)
        # Prometheus scrapes the pod's own port and the app's metrics route (annotation values are strings).
        notes = dep["spec"]["template"]["metadata"]["annotations"]
        assert notes["prometheus.io/scrape"] == "true" and notes["prometheus.io/port"] == str(ports["http"]), name
        assert notes["prometheus.io/path"] == "/metrics" and "/metrics" in APP_GET_ROUTES, name
        for key in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][key]), (name, key)
        assert pod["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"]
        assert not c["securityContext"]["allowPrivilegeEscalation"] and c["securityContext"]["capabilities"][
            "drop"
        ] == ["ALL"]
        assert pod["serviceAccountName"] == "tapper-serve" and pod["automountServiceAccountToken"] is False
        # The bundle and state directories live on the shared PVC.
        cm = by_kind(docs, "ConfigMap", "tapper-serve-config")["data"]
        claim = {v["name"]: v for v in pod["volumes"]}["models"]["persistentVolumeClaim"]["claimName"]
        mount = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}["models"]
        assert by_kind(docs, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]
        assert cm["TAPPER_MODEL_DIR"].startswith(mount + "/") and cm["TAPPER_STATE_DIR"].startswith(mount + "/")
        assert {e["configMapRef"]["name"] for e in c["envFrom"]} == {"tapper-serve-config"}


@needs_kubectl
def test_configmap_settings_are_read_by_the_server(rendered):
    source = "".join(p.read_text() for p in (REPO / "deploy").glob("*.py"))
    known = set(re.findall(r"TAPPER_[A-Z_]+", source))
    for name, docs in rendered.items():
        keys = set(by_kind(docs, "ConfigMap", "tapper-serve-config")["data"])
        env = {e["name"] for e in by_kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert keys | env <= known, f"{name}: settings nobody reads: {sorted((keys | env) - known)}"


def test_the_opt_in_scratch_dir_is_the_pods_local_scratch_volume():
    """The commented-out TAPPER_SCRATCH_DIR in the ConfigMap, once uncommented, must name the pod's own disk-backed
    emptyDir (a RAM-backed one would save nothing; the shared PVC is a network filesystem the server refuses)."""
    (scratch,) = re.findall(
        r"^\s*#\s*TAPPER_SCRATCH_DIR:\s*(\S+)\s*$", (K8S / "base" / "configmap.yaml").read_text(), re.M
    )
    deployment = next(
        d for d in yaml.safe_load_all((K8S / "base" / "deployment.yaml").read_text()) if d and d["kind"] == "Deployment"
    )
    pod = deployment["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    volume = {v["name"]: v for v in pod["volumes"]}[mounts[scratch]]
    assert mounts[scratch] == "user-scratch" and "medium" not in volume["emptyDir"] and volume["emptyDir"]["sizeLimit"]


@needs_kubectl
def test_zenml_orchestrator_rbac(rendered):
    docs = rendered["base"]
    sa = by_kind(docs, "ServiceAccount", "tapper-zenml")
    binding = by_kind(docs, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "tapper"}]
    role = by_kind(docs, "Role", binding["roleRef"]["name"])

    def allowed(group: str, resource: str, verb: str) -> bool:
        return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in role["rules"])

    for verb in ("create", "get", "list", "watch", "delete"):
        assert allowed("", "pods", verb) and allowed("batch", "cronjobs", verb) and allowed("batch", "jobs", verb)
    assert allowed("", "pods/log", "get") and allowed("", "secrets", "create")
    # zenml.yaml's k8s stack uses this account and namespace.
    stack = yaml.safe_load((REPO / "zenml.yaml").read_text())["stacks"]["k8s"]["components"]["orchestrator"]["config"]
    assert "tapper-zenml" in stack["service_account_name"] and "tapper" in stack["kubernetes_namespace"]


@needs_kubectl
def test_gpu_and_cpu_overlays(rendered):
    gpu = by_kind(rendered["overlays/gpu"], "Deployment")["spec"]["template"]["spec"]
    cpu = by_kind(rendered["overlays/cpu"], "Deployment")["spec"]["template"]["spec"]
    (gc,), (cc,) = gpu["containers"], cpu["containers"]
    assert gc["resources"]["limits"]["nvidia.com/gpu"] == "1" == gc["resources"]["requests"]["nvidia.com/gpu"]
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in gpu["tolerations"])
    assert gpu["nodeSelector"]
    assert "nvidia.com/gpu" not in cc["resources"]["limits"] and "tolerations" not in cpu
    assert gc["image"].endswith(":cu128") and cc["image"].endswith(":cpu")
    # The GPU overlay keeps the base's probes and security settings (strategic merge, not replacement).
    assert gc["readinessProbe"]["httpGet"]["path"] == "/health" and gc["securityContext"]["readOnlyRootFilesystem"]
    assert {m["name"] for m in gc["volumeMounts"]} >= {"models", "tmp", "cache", "dshm"}


@needs_kubectl
def test_tracking_services_render_and_validate_strict():
    """k8s/tracking: PostgreSQL (MLflow's store), the object store and the MLflow server, wired by Service names and
    by the two Secrets the docs create."""
    docs = render("tracking")
    for doc in docs:
        validate_strict(doc, "tracking")
    svc = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    mlflow = by_kind(docs, "Deployment", "tapper-mlflow")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in mlflow["env"]}
    assert (
        env["MLFLOW_S3_ENDPOINT_URL"]["value"]
        == f"http://tapper-object-store:{svc['tapper-object-store']['spec']['ports'][0]['port']}"
    )
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {
        "name": "tapper-tracking",
        "key": "backend-store-uri",
    }
    # MLflow at the version the project pins (pyproject.toml), as its Dockerfile installs it.
    pin = re.search(r'"mlflow==([^"]+)"', (REPO / "pyproject.toml").read_text())[1]
    assert (
        mlflow["image"].endswith(f":{pin}") and f"mlflow=={pin}" in (K8S / "tracking" / "Dockerfile.mlflow").read_text()
    )
    for name in ("tapper-postgres", "tapper-object-store"):
        sts = by_kind(docs, "StatefulSet", name)
        assert (
            sts["spec"]["serviceName"] == name
            and svc[name]["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
        )
