"""The k8s harness's own pieces that need no cluster (tests/k8s_harness): the listed API translation, the node
agent's image table, the known-bad fixtures' declarations. The harness itself runs under `make test-k8s`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import translate
import yaml
from translate import TranslationError, from_served, to_served, translate_path

HARNESS = Path(__file__).resolve().parent / "k8s_harness"
REPO = HARNESS.parents[1]


def test_exactly_three_translations():
    assert [(t.ga_api_version, t.served_api_version, t.kind) for t in translate.TRANSLATIONS] == [
        ("batch/v1", "batch/v1beta1", "CronJob"),
        ("policy/v1", "policy/v1beta1", "PodDisruptionBudget"),
        ("autoscaling/v2", "autoscaling/v2beta2", "HorizontalPodAutoscaler"),
    ]


@pytest.mark.parametrize("path", ["base/pdb.yaml", "base/hpa.yaml"])
def test_the_manifests_translate_by_apiVersion_only(path):
    doc = yaml.safe_load((REPO / "k8s" / path).read_text())
    served = to_served(doc)
    assert served["apiVersion"] != doc["apiVersion"] and {**served, "apiVersion": doc["apiVersion"]} == doc
    assert from_served(served) == doc


def test_other_kinds_and_versions_pass_untouched():
    for doc in [
        {"apiVersion": "batch/v1", "kind": "Job", "spec": {}},
        {"apiVersion": "apps/v1", "kind": "Deployment"},
        {"apiVersion": "v1", "kind": "Pod"},
    ]:
        assert to_served(doc) is doc and from_served(doc) is doc
    served = {"apiVersion": "batch/v1beta1", "kind": "CronJob"}
    assert to_served(served) is served


def test_lists_and_watch_events_come_back_in_the_ga_version():
    listed = {"apiVersion": "batch/v1beta1", "kind": "CronJobList", "items": [{"metadata": {"name": "a"}}]}
    assert from_served(listed)["apiVersion"] == "batch/v1"
    event = {"type": "ADDED", "object": {"apiVersion": "policy/v1beta1", "kind": "PodDisruptionBudget"}}
    assert from_served(event)["object"]["apiVersion"] == "policy/v1"
    mixed = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler"},
            {"apiVersion": "v1", "kind": "Service"},
        ],
    }
    assert [i["apiVersion"] for i in to_served(mixed)["items"]] == ["autoscaling/v2beta2", "v1"]


def test_what_v1beta1_cannot_say_is_refused_not_dropped():
    with pytest.raises(TranslationError, match="timeZone"):
        to_served({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "x"}, "spec": {"timeZone": "UTC"}})
    with pytest.raises(TranslationError, match="empty selector"):
        to_served(
            {
                "apiVersion": "policy/v1",
                "kind": "PodDisruptionBudget",
                "metadata": {"name": "x"},
                "spec": {"selector": {}, "maxUnavailable": 1},
            }
        )
    with pytest.raises(TranslationError, match="unhealthyPodEvictionPolicy"):
        to_served(
            {
                "apiVersion": "policy/v1",
                "kind": "PodDisruptionBudget",
                "metadata": {"name": "x"},
                "spec": {"unhealthyPodEvictionPolicy": "AlwaysAllow"},
            }
        )


@pytest.mark.parametrize(
    "path,served",
    [
        ("/apis/batch/v1/namespaces/tapper/cronjobs", "/apis/batch/v1beta1/namespaces/tapper/cronjobs"),
        (
            "/apis/batch/v1/namespaces/tapper/cronjobs/x/status?pretty=true",
            "/apis/batch/v1beta1/namespaces/tapper/cronjobs/x/status?pretty=true",
        ),
        ("/apis/batch/v1/cronjobs?watch=true", "/apis/batch/v1beta1/cronjobs?watch=true"),
        ("/apis/batch/v1/watch/namespaces/tapper/cronjobs", "/apis/batch/v1beta1/watch/namespaces/tapper/cronjobs"),
        (
            "/apis/policy/v1/namespaces/tapper/poddisruptionbudgets/p",
            "/apis/policy/v1beta1/namespaces/tapper/poddisruptionbudgets/p",
        ),
        (
            "/apis/autoscaling/v2/namespaces/tapper/horizontalpodautoscalers",
            "/apis/autoscaling/v2beta2/namespaces/tapper/horizontalpodautoscalers",
        ),
        ("/apis/batch/v1/namespaces/tapper/jobs", None),
        ("/apis/autoscaling/v1/namespaces/tapper/horizontalpodautoscalers", None),
        ("/api/v1/namespaces/tapper/pods", None),
        ("/apis/batch/v1", None),
    ],
)
def test_request_paths(path, served):
    assert translate_path(path) == served


def test_the_agents_images_come_from_the_projects_dockerfiles():
    from node_agent import image_repository, image_table

    table, upstream = image_table(REPO, REPO / ".venv")
    assert set(table) == {"tapper-pipeline", "tapper-serve", "tapper-mlflow"}
    mlflow = table["tapper-mlflow"]
    assert mlflow.entrypoint == ["mlflow"] and mlflow.cmd[0] == "server" and mlflow.user == "10001:10001"
    serve = table["tapper-serve"]
    assert serve.entrypoint == ["tapper"] and serve.cmd == ["serve"] and serve.user == "10001:10001"
    assert serve.workdir == "/home/tapper" and serve.env["TAPPER_PORT"] == "8080"
    pipe = table["tapper-pipeline"]
    assert pipe.workdir == "/app" and pipe.env["HF_HUB_OFFLINE"] == "1" and pipe.entrypoint == []
    assert image_repository("registry.example.com/tapper/tapper-serve:cu128") == "tapper-serve"
    assert image_repository("tapper-pipeline@sha256:abc") == "tapper-pipeline"
    # Third-party images run only as the table's documented substitutes, and only where those can run here.
    minio = upstream["quay.io/minio/minio:RELEASE.2025-04-22T22-12-26Z"]
    assert minio.entrypoint[-1].endswith("tests/k8s_harness/images/minio-substitute.py") and minio.venv is False
    postgres_here = Path("/usr/lib/postgresql/15/bin/postgres").exists()
    assert ("postgres:15-bookworm" in upstream) == postgres_here


def test_every_bad_fixture_declares_what_rejects_it():
    files = sorted((HARNESS / "fixtures" / "bad").glob("*.yaml"))
    assert len(files) >= 5
    for f in files:
        head = dict(
            m.groups() for line in f.read_text().splitlines() if (m := re.match(r"# (rejected-by|expect): (.*)$", line))
        )
        assert head.get("rejected-by") in ("apiserver", "schema") and head.get("expect"), f.name
