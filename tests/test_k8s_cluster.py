"""The Kubernetes production stack, exercised for real on a local v1.20 control plane (`make test-k8s`).

tests/k8s_harness/harness.sh starts etcd, kube-apiserver (token auth, RBAC), kube-controller-manager and
kube-scheduler, registers the node pools (a tainted GPU node, two CPU nodes), the node agent that runs bound pods
as local processes (the one stand-in: kubelet + container runtime), an S3 API server, PostgreSQL behind MLflow's
tracking server and a ZenML server, then runs this module. Everything here goes through the API server: ZenML's
Kubernetes orchestrator creates the orchestrator and step pods, the real scheduler places them, the real Job,
CronJob, ReplicaSet, Deployment, HPA and PV-binder controllers act on them.

The tests run in file order and build on each other (apply the manifests, train, serve, fail a GPU step on
purpose, schedule).
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.k8s

REPO = Path(__file__).resolve().parents[1]
HARNESS_DIR = REPO / "tests" / "k8s_harness"
STATE = os.environ.get("TAPPER_K8S_HARNESS")
NS = "tapper"
CONFIG = HARNESS_DIR / "k8s-tiny.yaml"
GPU_NODE = "gpu-pool-1"
TARGET_VERSION = "1.34.0"  # the Kubernetes version the manifests are written for (tests/test_k8s.py: 1.34, 1.37)
RUN_TIMEOUT_S = int(os.environ.get("TAPPER_K8S_RUN_TIMEOUT", "1800"))


@pytest.fixture(scope="module")
def harness():
    if not STATE:
        pytest.skip("needs the local control plane: run `make test-k8s` (tests/k8s_harness/harness.sh)")
    return Path(STATE)


def kubectl(
    *args: str, input: str | None = None, check: bool = True, context: str = "tapper-harness-direct", timeout: int = 120
) -> subprocess.CompletedProcess:
    out = subprocess.run(
        ["kubectl", "--context", context, *args], input=input, capture_output=True, text=True, timeout=timeout
    )
    if check and out.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return out


def render(path: str) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(REPO / "k8s" / path)], capture_output=True, text=True, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def apply(docs: list[dict]) -> str:
    """kubectl apply, with the harness's listed translation (translate.py) and nothing else."""
    from translate import to_served

    served = {"apiVersion": "v1", "kind": "List", "items": [to_served(d) for d in docs]}
    return kubectl("apply", "-f", "-", input=json.dumps(served)).stdout


@pytest.fixture(scope="module")
def core(harness):
    from kubernetes import client, config

    config.load_kube_config(context="tapper-harness")  # through the translating proxy, as ZenML does
    return client.CoreV1Api()


@pytest.fixture(scope="module")
def batch(core):
    from kubernetes import client

    return client.BatchV1Api()


def wait(what: str, fn, timeout: float, every: float = 2.0):
    deadline = time.time() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def gpu_steps(cfg: dict) -> set[str]:
    return {
        name
        for name, s in (cfg.get("steps") or {}).items()
        if any(
            t.get("key") == "nvidia.com/gpu"
            for t in ((s.get("settings") or {}).get("orchestrator") or {})
            .get("pod_settings", {})
            .get("tolerations", [])
        )
    }


# --- 1. the node pools ---------------------------------------------------------------------------------------------


def test_nodes_mirror_the_pools_the_manifests_and_configs_expect(core):
    nodes = {n.metadata.name: n for n in core.list_node().items}
    gpu = [n for n in nodes.values() if n.metadata.labels.get("nvidia.com/gpu.present") == "true"]
    cpu = [n for n in nodes.values() if n not in gpu]
    assert [n.metadata.name for n in gpu] == [GPU_NODE] and len(cpu) == 2
    (g,) = gpu
    assert g.status.allocatable["nvidia.com/gpu"] == "1"
    assert [(t.key, t.value, t.effect) for t in g.spec.taints] == [("nvidia.com/gpu", "present", "NoSchedule")]
    assert all(not n.spec.taints and "nvidia.com/gpu" not in n.status.allocatable for n in cpu)
    assert all(next(c for c in n.status.conditions if c.type == "Ready").status == "True" for n in nodes.values())
    # The GPU overlay and the GPU run configs select exactly this label and tolerate exactly this taint.
    overlay = next(d for d in render("overlays/gpu") if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert overlay["nodeSelector"].items() <= g.metadata.labels.items()
    prod = yaml.safe_load((REPO / "configs" / "qwen3-4b-lamp2m.yaml").read_text())
    tiny = yaml.safe_load(CONFIG.read_text())
    assert gpu_steps(tiny) == gpu_steps(prod) >= {"train_stage1", "train_stage2", "evaluate_base", "evaluate_tapper"}
    for cfg in (prod, tiny):
        for step in gpu_steps(cfg):
            ps = cfg["steps"][step]["settings"]["orchestrator"]["pod_settings"]
            assert ps["node_selectors"].items() <= g.metadata.labels.items(), step


# --- 2. the manifests ----------------------------------------------------------------------------------------------

BAD = HARNESS_DIR / "fixtures" / "bad"


def test_manifests_apply_to_the_control_plane(core):
    docs = render("overlays/cpu") + render("tracking")
    # The untranslated manifests are valid for the target version (--strict: no unknown fields) ...
    for d in docs:
        import kubernetes_validate

        kubernetes_validate.validate(d, TARGET_VERSION, strict=True)
    out = apply(docs)
    for kind, name in [
        ("deployment.apps", "tapper-serve"),
        ("horizontalpodautoscaler.autoscaling", "tapper-serve"),
        ("poddisruptionbudget.policy", "tapper-serve"),
        ("role.rbac.authorization.k8s.io", "tapper-zenml-orchestrator"),
        ("statefulset.apps", "tapper-postgres"),
        ("deployment.apps", "tapper-mlflow"),
        ("statefulset.apps", "tapper-object-store"),
    ]:
        assert f"{kind}/{name}" in out, out

    # ... and read back through the API in their GA versions.
    def get(path: str) -> dict:  # through the translating endpoint, as ZenML and the tests' client reach it
        return json.loads(kubectl("get", "--raw", path, context="tapper-harness").stdout)

    pdb = get(f"/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/tapper-serve")
    assert pdb["apiVersion"] == "policy/v1" and pdb["spec"]["minAvailable"] == 1
    hpa = get(f"/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers/tapper-serve")
    assert (
        hpa["apiVersion"] == "autoscaling/v2"
        and hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 600
    )
    # The claims bind to the harness's volumes (the real PV binder), so pods using them can be scheduled.
    wait(
        "PVCs bound",
        lambda: all(c.status.phase == "Bound" for c in core.list_namespaced_persistent_volume_claim(NS).items),
        60,
    )
    # The orchestrator's RBAC is what ZenML needs, enforced by the API server for its service account.
    for verb, res in [
        ("create", "pods"),
        ("create", "jobs.batch"),
        ("create", "cronjobs.batch"),
        ("get", "pods/log"),
        ("create", "secrets"),
    ]:
        assert (
            kubectl(
                "auth", "can-i", verb, res, "-n", NS, f"--as=system:serviceaccount:{NS}:tapper-zenml"
            ).stdout.strip()
            == "yes"
        )
    assert (
        kubectl(
            "auth",
            "can-i",
            "create",
            "pods",
            "-n",
            "default",
            f"--as=system:serviceaccount:{NS}:tapper-zenml",
            check=False,
        ).stdout.strip()
        == "no"
    )


@pytest.mark.parametrize("fixture", sorted(p.name for p in BAD.glob("*.yaml")))
def test_known_bad_manifests_are_rejected(fixture, core):
    """Each fixture names what rejects it: the API server (validation/admission, server-side dry run) or, for what
    v1.20 silently drops, the strict schema check at the target version."""
    import kubernetes_validate
    from translate import to_served

    text = (BAD / fixture).read_text()
    header = dict(m.groups() for line in text.splitlines() if (m := re.match(r"# (rejected-by|expect): (.*)$", line)))
    doc = yaml.safe_load(text)
    served = json.dumps(to_served(doc))
    # --validate=false: what the API server itself does (kubectl's own client-side check is not there for ZenML's
    # or any other API client's requests).
    dry = kubectl("create", "--dry-run=server", "--validate=false", "-n", NS, "-f", "-", input=served, check=False)
    if header["rejected-by"] == "apiserver":
        assert dry.returncode != 0 and header["expect"] in dry.stderr, dry.stderr
    else:
        assert header["rejected-by"] == "schema"
        assert dry.returncode == 0, f"v1.20 accepts it (drops the unknown field): {dry.stderr}"
        with pytest.raises(kubernetes_validate.ValidationError, match=header["expect"]):
            kubernetes_validate.validate(doc, TARGET_VERSION, strict=True)


# --- 2b. the tracking stack of k8s/tracking rolls out and works ----------------------------------------------------

TRACKING = [("statefulset", "tapper-postgres"), ("statefulset", "tapper-object-store"), ("deployment", "tapper-mlflow")]
TRACKING_ROLLOUT_S = 180


def tracking_diagnostics(core) -> str:
    """Events, container states and the last log lines of the tracking pods, for a failure message."""
    out = []
    for p in core.list_namespaced_pod(
        NS, label_selector="app.kubernetes.io/component in (tracking, tracking-db, object-store)"
    ).items:
        name = p.metadata.name
        out.append(f"--- pod {name} on {p.spec.node_name}: {p.status.phase}, IP {p.status.pod_ip}")
        for cs in p.status.container_statuses or []:
            out.append(
                f"  {cs.name}: ready={cs.ready} restarts={cs.restart_count} state={cs.state.to_dict()} "
                f"last={cs.last_state.to_dict()}"
            )
        ev = kubectl("-n", NS, "get", "events", "--field-selector", f"involvedObject.name={name}", check=False)
        out.append(ev.stdout.strip())
        logs = kubectl("-n", NS, "logs", name, "--tail", "40", check=False, context="tapper-harness")
        out.append(logs.stdout.strip() or logs.stderr.strip())
    return "\n".join(out)


def test_tracking_stack_rolls_out_and_mlflow_tracks_into_its_postgres_and_object_store(core):
    """k8s/tracking under the node agent: PostgreSQL (Debian's postgresql-15 behind the postgres image's entrypoint
    contract), the object store (moto's S3 server in MinIO's place, images.yaml) and the project's tapper-mlflow
    image roll out, their probes pass; MLflow, reached through its Service, writes an experiment into the pod's
    PostgreSQL and an artifact into the object store's bucket, both reached by MLflow through their Services."""
    import secrets
    import urllib.error
    import urllib.request

    import boto3
    import psycopg2

    apply(render("tracking"))
    # The two Secrets of docs/kubernetes.md, step 4 (kept if they exist: the database was initialised with them).
    pg_password, s3_key, s3_secret = secrets.token_hex(16), "tapper-" + secrets.token_hex(4), secrets.token_hex(16)
    for name, literals in [
        (
            "tapper-tracking",
            {
                "postgres-password": pg_password,
                "backend-store-uri": f"postgresql://mlflow:{pg_password}@tapper-postgres:5432/mlflow",
            },
        ),
        ("tapper-object-store", {"aws_access_key_id": s3_key, "aws_secret_access_key": s3_secret}),
    ]:
        doc = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": NS},
            "type": "Opaque",
            "stringData": literals,
        }
        kubectl("create", "-f", "-", input=json.dumps(doc), check=False)
    import base64

    def secret(name: str, key: str) -> str:
        return base64.b64decode(core.read_namespaced_secret(name, NS).data[key]).decode()

    pg_password = secret("tapper-tracking", "postgres-password")
    s3_key, s3_secret = (
        secret("tapper-object-store", "aws_access_key_id"),
        secret("tapper-object-store", "aws_secret_access_key"),
    )
    deadline = time.time() + TRACKING_ROLLOUT_S
    for kind, name in TRACKING:
        left = max(1, int(deadline - time.time()))
        status = kubectl(
            "-n", NS, "rollout", "status", f"{kind}/{name}", f"--timeout={left}s", check=False, timeout=left + 30
        )
        assert status.returncode == 0, (
            f"{kind}/{name} did not roll out within {TRACKING_ROLLOUT_S}s:\n"
            f"{status.stdout}{status.stderr}\n{tracking_diagnostics(core)}"
        )
    svc = {name: core.read_namespaced_service(name, NS).spec.cluster_ip for _, name in TRACKING}

    # A finished rollout has ready pods; their Services' Endpoints (the endpoints controller) follow within moments.
    def endpoints_ready():
        return all(
            any(s.addresses for s in core.read_namespaced_endpoints(name, NS).subsets or []) for _, name in TRACKING
        )

    wait("the tracking Services' endpoints", endpoints_ready, 30, every=1)
    try:
        # The object store, through its Service: the buckets (docs/kubernetes.md, step 4), with the Secret's keys.
        s3 = boto3.client(
            "s3",
            endpoint_url=f"http://{svc['tapper-object-store']}:9000",
            aws_access_key_id=s3_key,
            aws_secret_access_key=s3_secret,
            region_name="us-east-1",
        )
        for bucket in ("tapper-artifacts", "tapper-mlflow"):
            s3.create_bucket(Bucket=bucket)
        # MLflow, through its Service, addressed as in-cluster clients address it (the Host header of
        # http://tapper-mlflow:5000; the name itself resolves only inside the pods): health, an experiment and a run
        # through the REST API, an artifact upload.
        base = f"http://{svc['tapper-mlflow']}:5000"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

        def call(method: str, path: str, body=None, raw: bytes | None = None, host: str = "tapper-mlflow:5000"):
            data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
            headers = {"Host": host, **({"Content-Type": "application/json"} if raw is None else {})}
            with opener.open(
                urllib.request.Request(base + path, data=data, method=method, headers=headers), timeout=30
            ) as r:
                text = r.read().decode()
                return json.loads(text) if text.strip().startswith("{") else text

        # The first request after the rollout has been reset by the peer once in a fresh-clone CI run (MLflow ready by
        # its probe, the relay connected): a client of a freshly rolled-out Service retries, so this one does too,
        # for a bounded time, and every later call must then succeed at once.
        def healthy() -> bool:
            try:
                return call("GET", "/health").strip() == "OK"
            except (ConnectionError, urllib.error.URLError, TimeoutError):
                return False

        wait("MLflow's /health through its Service", healthy, 60, every=1)
        assert call("GET", "/health", host=f"tapper-mlflow.{NS}.svc.cluster.local:5000").strip() == "OK"
        experiment = f"k8s-tracking-{secrets.token_hex(4)}"
        exp_id = call("POST", "/api/2.0/mlflow/experiments/create", {"name": experiment})["experiment_id"]
        run = call(
            "POST", "/api/2.0/mlflow/runs/create", {"experiment_id": exp_id, "start_time": int(time.time() * 1000)}
        )["run"]
        run_id = run["info"]["run_id"]
        assert run["info"]["artifact_uri"] == f"mlflow-artifacts:/{exp_id}/{run_id}/artifacts"
        payload = f"tapper k8s tracking {run_id}\n".encode()
        call("PUT", f"/api/2.0/mlflow-artifacts/artifacts/{exp_id}/{run_id}/artifacts/hello.txt", raw=payload)
        # The experiment and the run are rows in the PostgreSQL pod's database (not the harness's own PostgreSQL).
        with (
            psycopg2.connect(
                host=svc["tapper-postgres"],
                port=5432,
                user="mlflow",
                password=pg_password,
                dbname="mlflow",
                connect_timeout=10,
            ) as conn,
            conn.cursor() as cur,
        ):
            cur.execute("select name from experiments where experiment_id = %s", (int(exp_id),))
            assert cur.fetchone() == (experiment,)
            cur.execute("select experiment_id from runs where run_uuid = %s", (run_id,))
            assert cur.fetchone() == (int(exp_id),)
        # The artifact is an object in the object store's bucket, where MLflow's server put it.
        obj = s3.get_object(Bucket="tapper-mlflow", Key=f"artifacts/{exp_id}/{run_id}/artifacts/hello.txt")
        assert obj["Body"].read() == payload
    except Exception as err:  # noqa: BLE001 - the pods' side of the story
        raise AssertionError(f"{err!r}\n{tracking_diagnostics(core)}") from err
    # Every tracking pod has its own pod IP (their Services' endpoints) and passed its readiness probe.
    pods = core.list_namespaced_pod(
        NS, label_selector="app.kubernetes.io/component in (tracking, tracking-db, object-store)"
    ).items
    ready = [
        p
        for p in pods
        if p.metadata.deletion_timestamp is None and all(c.ready for c in p.status.container_statuses or [])
    ]
    assert (
        len(ready) == 3
        and len({p.status.pod_ip for p in ready}) == 3
        and "127.0.0.1" not in {p.status.pod_ip for p in ready}
    )
    for _, name in TRACKING:
        ep = core.read_namespaced_endpoints(name, NS)
        assert [a.ip for s in ep.subsets or [] for a in s.addresses or []], f"no ready endpoints for {name}"


# --- 3. the training pipeline through ZenML's Kubernetes orchestrator ----------------------------------------------


@pytest.fixture(scope="module")
def zenml_k8s(harness):
    """This test process as a client of the harness's ZenML server, with the `k8s` stack of zenml.yaml active."""
    from zenml.client import Client
    from zenml.config.global_config import GlobalConfiguration
    from zenml.utils import source_utils
    from zenml.zen_stores.rest_zen_store import RestZenStoreConfiguration

    GlobalConfiguration().set_store(
        RestZenStoreConfiguration(
            url=os.environ["TAPPER_ZENML_URL"],
            username=os.environ["TAPPER_ZENML_USER"],
            password=os.environ["TAPPER_ZENML_PASSWORD"],
        )
    )
    source_utils.set_custom_source_root(str(REPO))
    client = Client()
    try:
        client.get_secret("tapper-object-store")
    except KeyError:
        client.create_secret(
            "tapper-object-store",
            values={
                "aws_access_key_id": os.environ["AWS_ACCESS_KEY_ID"],
                "aws_secret_access_key": os.environ["AWS_SECRET_ACCESS_KEY"],
            },
        )
    from pipelines.stacks import stack_up

    assert "registered and active" in stack_up("k8s")
    return client


def run_and_wait(cfg: dict, client):
    from pipelines.run import resolve_config, run_training

    run = run_training(resolve_config(cfg))
    assert run is not None
    return wait(
        f"run {run.name} to finish",
        lambda: (r := client.get_pipeline_run(run.id)).status.is_finished and r,
        RUN_TIMEOUT_S,
        every=5,
    )


def run_pods(core, run_id) -> list:
    return core.list_namespaced_pod(NS, label_selector=f"run_id={run_id}").items


def orchestrator_log(core, pods) -> str:
    """The orchestrator pod's log through the API (the node's kubelet endpoint), without ZenML's colour codes."""
    (orch,) = [p for p in pods if "step_name" not in p.metadata.labels]
    text = kubectl("-n", NS, "logs", orch.metadata.name, context="tapper-harness").stdout
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def finished_orchestrator_log(core, run_id) -> str:
    """The orchestrator pod's whole log, read once its container has exited. ZenML's server can report the run as
    failed (from the failed step) while the orchestrator is still writing its last lines ("The following steps
    failed: ..."), so a log read as soon as the run is finished can miss them."""

    def orchestrator_done():
        orch = [p for p in run_pods(core, run_id) if "step_name" not in p.metadata.labels]
        return len(orch) == 1 and orch[0].status.phase in ("Succeeded", "Failed") and orch

    return orchestrator_log(core, wait("the orchestrator pod to exit", orchestrator_done, 180))


def model_name(run) -> str:
    """The run's model: tapper puts `model:` on the steps after validation (pipelines.run.model_after_validation),
    so no version is created for a run that bad data stops; the registration step always carries it."""
    return (run.config.model or run.steps["register_model"].config.model).name


@pytest.fixture(scope="module")
def trained(zenml_k8s, core):
    cfg = yaml.safe_load(CONFIG.read_text())
    run = run_and_wait(cfg, zenml_k8s)
    return cfg, run


def test_training_pipeline_completes_on_the_k8s_stack(trained, core, zenml_k8s):
    cfg, run = trained
    pods = run_pods(core, run.id)
    if run.status.value != "completed":
        pytest.fail(f"run {run.name}: {run.status.value}\n" + orchestrator_log(core, pods)[-6000:])
    steps = {name: s.status.value for name, s in run.steps.items()}
    assert all(v == "completed" for v in steps.values()), steps

    # One orchestrator pod and one pod per step, all created by ZenML, all finished with exit code 0.
    def finished():
        ps = run_pods(core, run.id)
        return ps if all(p.status.phase == "Succeeded" for p in ps) else None

    pods = wait("the run's pods to finish", finished, 120)
    by_step = {p.metadata.labels.get("step_name", "orchestrator"): p for p in pods}
    assert set(by_step) == set(steps) | {"orchestrator"}, sorted(by_step)
    assert all(p.status.container_statuses[0].state.terminated.exit_code == 0 for p in pods)
    # The GPU steps ran on the GPU node and only there; everything else on the CPU pool.
    placed = {name: p.spec.node_name for name, p in by_step.items()}
    gpu = gpu_steps(cfg)
    assert {s for s, n in placed.items() if n == GPU_NODE} == gpu, placed
    assert all(n.startswith("cpu-pool-") for s, n in placed.items() if s not in gpu), placed
    # Artifacts live in the S3 store, tracking and the registry in MLflow (on PostgreSQL).
    uri = run.steps["train_stage1"].outputs
    assert all(a.uri.startswith(f"s3://{os.environ['TAPPER_S3_BUCKET']}/zenml/") for outs in uri.values() for a in outs)
    import boto3

    s3 = boto3.client("s3", endpoint_url=os.environ["TAPPER_S3_ENDPOINT"])
    assert s3.list_objects_v2(Bucket=os.environ["TAPPER_S3_BUCKET"], Prefix="zenml/")["KeyCount"] > 0
    assert s3.list_objects_v2(Bucket="tapper-mlflow", Prefix="artifacts/")["KeyCount"] > 0  # proxied by MLflow
    import mlflow

    model = model_name(run)
    mc = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    prod = mc.get_model_version_by_alias(model, "production")
    assert prod.tags.get("stage") == "production"
    assert mc.get_run(prod.run_id).data.metrics  # the metrics the promotion gate compared
    from zenml.enums import ModelStages

    assert str(zenml_k8s.get_model_version(model, ModelStages.PRODUCTION).number) == prod.tags["zenml_model_version"]
    # MLflow's metadata is in PostgreSQL.
    import psycopg2

    with psycopg2.connect(os.environ["TAPPER_K8S_PG_URI"]) as conn, conn.cursor() as cur:
        cur.execute("select count(*) from model_versions where name = %s", (model,))
        assert cur.fetchone()[0] >= 1
    # The promotion exported the serving bundle onto the serving volume (the PVC's PersistentVolume).
    assert (Path(STATE) / "volumes" / "tapper-models" / "bundles" / model / "current").is_dir()


def test_serving_rolls_out_on_the_promoted_bundle(trained, core):
    """The serving Deployment of k8s/overlays/cpu, pointed at the promoted bundle: `tapper serve` processes pass
    their startup/readiness probes, the HPA holds minReplicas, the rollout completes."""
    cfg, run = trained
    # The bearer tokens the Deployment requires (deploy/README.md, "Auth"); without the Secret no pod starts.
    import secrets

    kubectl(
        "-n",
        NS,
        "apply",
        "-f",
        "-",
        input=kubectl(
            "-n",
            NS,
            "create",
            "secret",
            "generic",
            "tapper-serve-tokens",
            "--dry-run=client",
            "-o",
            "json",
            f"--from-literal=api-token={secrets.token_hex(32)}",
            f"--from-literal=admin-token={secrets.token_hex(32)}",
        ).stdout,
    )
    model_dir = f"/models/bundles/{model_name(run)}/current"
    kubectl(
        "-n",
        NS,
        "patch",
        "configmap",
        "tapper-serve-config",
        "--type",
        "merge",
        "-p",
        json.dumps({"data": {"TAPPER_MODEL_DIR": model_dir}}),
    )
    kubectl("-n", NS, "rollout", "restart", "deployment/tapper-serve")
    status = kubectl(
        "-n", NS, "rollout", "status", "deployment/tapper-serve", "--timeout", "600s", check=False, timeout=660
    )
    pods = core.list_namespaced_pod(NS, label_selector="app.kubernetes.io/name=tapper-serve").items
    assert status.returncode == 0, (
        status.stdout
        + status.stderr
        + "\n".join(f"{p.metadata.name} {p.status.phase} {p.status.container_statuses}" for p in pods)
    )
    ready = [
        p
        for p in pods
        if p.metadata.deletion_timestamp is None
        and p.status.phase == "Running"
        and all(c.ready for c in p.status.container_statuses)
    ]
    assert len(ready) >= 2  # the HPA's minReplicas
    assert all(p.spec.node_name.startswith("cpu-pool-") for p in ready)


# --- 4. a GPU step without its toleration ------------------------------------------------------------------------


def test_gpu_step_without_toleration_stays_pending_and_the_run_fails_clearly(trained, zenml_k8s, core):
    cfg = copy.deepcopy(trained[0])
    stage1 = cfg["steps"]["train_stage1"]
    stage1["enable_cache"] = False
    ps = copy.deepcopy(stage1["settings"]["orchestrator"]["pod_settings"])
    ps.pop("tolerations")
    stage1["settings"] = {"orchestrator": {"pod_settings": ps, "active_deadline_seconds": 60}}
    from pipelines.run import resolve_config, run_training

    run = run_training(resolve_config(cfg))
    seen: dict = {}

    def pending_pod():
        for p in core.list_namespaced_pod(NS, label_selector=f"run_id={run.id},step_name=train_stage1").items:
            for c in p.status.conditions or []:
                if c.type == "PodScheduled" and c.status == "False":
                    seen.update(phase=p.status.phase, reason=c.reason, message=c.message, node=p.spec.node_name)
                    return True
        return False

    wait("the train_stage1 pod to be reported unschedulable", pending_pod, 600)
    assert seen["phase"] == "Pending" and seen["reason"] == "Unschedulable" and seen["node"] is None
    assert "had taint {nvidia.com/gpu: present}, that the pod didn't tolerate" in seen["message"], seen
    final = wait(
        "the run to fail", lambda: (r := zenml_k8s.get_pipeline_run(run.id)).status.is_finished and r, 600, every=5
    )
    assert final.status.value == "failed"
    assert final.steps["train_stage1"].status.value == "failed"
    text = finished_orchestrator_log(core, run.id)
    assert (
        "Job for step train_stage1 is pending" in text
        and "had taint {nvidia.com/gpu: present}, that the pod didn't tolerate" in text
    ), text[-4000:]
    assert "Job for step train_stage1 failed: Job was active longer than specified deadline" in text, text[-4000:]
    assert "The following steps failed: train_stage1" in text


# --- 5. a schedule -------------------------------------------------------------------------------------------------


def test_cron_schedule_becomes_a_cronjob_that_fires_onto_the_gpu_pool(trained, zenml_k8s, core, batch):
    from zenml.integrations.kubernetes.constants import KUBERNETES_CRON_JOB_METADATA_KEY

    cfg = copy.deepcopy(trained[0])
    cfg["schedule"] = {"cron_expression": "* * * * *"}
    cfg["steps"]["evaluate_tapper"]["enable_cache"] = False  # so the scheduled run has a GPU pod to place
    from pipelines.run import resolve_config, run_training

    before = {s.id for s in zenml_k8s.list_schedules(size=100)}
    assert run_training(resolve_config(cfg)) is None
    (schedule,) = [s for s in zenml_k8s.list_schedules(size=100) if s.id not in before]
    name = schedule.run_metadata[KUBERNETES_CRON_JOB_METADATA_KEY]
    cj = batch.read_namespaced_cron_job(name, NS)  # batch/v1, through the API as ZenML created it
    stack = yaml.safe_load((REPO / "zenml.yaml").read_text())["stacks"]["k8s"]["components"]["orchestrator"]["config"]
    assert cj.spec.schedule == "* * * * *" and cj.spec.concurrency_policy == stack["concurrency_policy"] == "Forbid"
    assert cj.spec.successful_jobs_history_limit == stack["successful_jobs_history_limit"]
    assert cj.spec.failed_jobs_history_limit == stack["failed_jobs_history_limit"]
    assert cj.spec.starting_deadline_seconds == stack["starting_deadline_seconds"]
    assert (
        kubectl("get", "cronjobs.v1beta1.batch", name, "-n", NS, "-o", "name").stdout.strip() == f"cronjob.batch/{name}"
    )

    def fired():
        return [
            j
            for j in batch.list_namespaced_job(NS).items
            if any(o.kind == "CronJob" and o.name == name for o in j.metadata.owner_references or [])
        ]

    (job,) = wait("the CronJob controller to create a Job", fired, 150)
    # One firing is enough: suspend the CronJob itself (a PATCH of batch/v1). Not through ZenML: deactivating the
    # ZenML schedule also revokes the API token its runs use, and would fail the run that just started.
    batch.patch_namespaced_cron_job(name, NS, {"spec": {"suspend": True}})
    assert batch.read_namespaced_cron_job(name, NS).spec.suspend is True
    # The controller names the Job after the schedule time it fires for (v1.20's controller: Unix seconds; the v2
    # controller: minutes): a minute boundary, and the Job was created within that minute (the controller syncs
    # every 10 s; the margin is for a loaded machine).
    created = job.metadata.creation_timestamp
    stamp = int(job.metadata.name.rsplit("-", 1)[1])
    scheduled = stamp if stamp > 10**9 else stamp * 60
    assert scheduled % 60 == 0, f"Job {job.metadata.name} is not for a minute boundary"
    assert 0 <= created.timestamp() - scheduled < 60, f"Job for {scheduled} created at {created}"
    orch = wait(
        "the scheduled orchestrator pod",
        lambda: core.list_namespaced_pod(NS, label_selector=f"job-name={job.metadata.name}").items,
        60,
    )
    assert orch[0].spec.node_name is None or orch[0].spec.node_name.startswith("cpu-pool-")

    def scheduled_run():
        runs = [
            r
            for r in zenml_k8s.list_pipeline_runs(size=50, sort_by="desc:created").items
            if r.schedule and r.schedule.id == schedule.id
        ]
        return runs[0] if runs else None

    run = wait("the scheduled run to be created", scheduled_run, 300)

    def gpu_pod():
        pods = core.list_namespaced_pod(NS, label_selector=f"run_id={run.id},step_name=evaluate_tapper").items
        return pods if pods and pods[0].spec.node_name else None

    (pod,) = wait("the scheduled run's GPU step pod to be placed", gpu_pod, RUN_TIMEOUT_S, every=5)
    assert pod.spec.node_name == GPU_NODE
    final = wait(
        "the scheduled run to finish",
        lambda: (r := zenml_k8s.get_pipeline_run(run.id)).status.is_finished and r,
        RUN_TIMEOUT_S,
        every=5,
    )
    assert final.status.value == "completed", orchestrator_log(core, run_pods(core, run.id))[-4000:]
    assert len(fired()) == 1
    # ZenML's schedule updates reach the CronJob (a PATCH of batch/v1) ...
    zenml_k8s.update_schedule(schedule.id, cron_expression="0 3 * * *")
    assert batch.read_namespaced_cron_job(name, NS).spec.schedule == "0 3 * * *"
    # ... and deleting the schedule deletes it (a DELETE of batch/v1).
    zenml_k8s.delete_schedule(schedule.id)
    from kubernetes.client.rest import ApiException

    def gone():  # the garbage collector first orphans the CronJob's Jobs (v1beta1's default policy), then removes it
        try:
            batch.read_namespaced_cron_job(name, NS)
        except ApiException as err:
            return err.status == 404
        return False

    wait("the CronJob to be deleted", gone, 120)
