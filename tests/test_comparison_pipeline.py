"""The comparison switch of the training pipeline (configs/compare-tiny.yaml) on the tiny backbone, in an
isolated ZenML + MLflow store: every configured variant (TAP-PER, an ablation, baselines registered by
tapper.methods) is evaluated on the same split, and the comparison report (tapper.analysis.report) is an
artifact with a Markdown table, PNG plots and dashboard visualizations, also logged to MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest

from workflow_data import isolated_workflow  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ["base", "rag-k1", "oppu", "pq-only", "tap-per", "no-bridge"]


@pytest.fixture(scope="module")
def zen(tmp_path_factory):
    """An isolated ZenML + MLflow + tapper cache, set up before zenml is first imported."""
    yield from isolated_workflow(tmp_path_factory.mktemp("zen-compare"))


def test_comparison_report(zen, monkeypatch):
    import mlflow
    from zenml import get_step_context
    from zenml.client import Client

    import tapper.model.shared_cache as shared_cache
    from pipelines.run import resolve_config, run_training

    # Which step opens an embedding cache (the local orchestrator runs the steps in this process): each step
    # opens at most one, so a variant's training and evaluation read one cache (hashed and loaded once).
    opened, real_cache = [], shared_cache.EmbeddingCache

    def counting_cache(*args, **kwargs):
        opened.append(get_step_context().step_run.name)
        return real_cache(*args, **kwargs)

    monkeypatch.setattr(shared_cache, "EmbeddingCache", counting_cache)

    cfg = resolve_config(ROOT / "configs" / "compare-tiny.yaml", questions=zen["questions"], outputs=zen["outputs"])
    assert cfg["parameters"]["compare"] is True and cfg["parameters"]["variants"] == VARIANTS
    run = Client().get_pipeline_run(run_training(cfg).id)
    s = {n: str(st.status.value) for n, st in run.steps.items()}
    assert str(run.status.value) == "completed", s
    assert {"evaluate_rag-k1", "evaluate_oppu", "evaluate_pq-only", "evaluate_no-bridge", "comparison_report"} <= set(s)
    per_step = {name: opened.count(name) for name in opened}
    assert {"evaluate_pq-only", "evaluate_no-bridge"} <= set(per_step) and set(per_step.values()) == {1}, per_step
    art = run.steps["comparison_report"].outputs["comparison_report"][0]
    rep = art.load()
    assert list(rep.metrics["variants"]) == VARIANTS
    assert rep.metrics["params"]["rag-k1"]["per_user"] == 0 and rep.metrics["params"]["pq-only"]["per_user"] == 0
    assert rep.metrics["params"]["tap-per"]["per_user"] > 0 and rep.metrics["params"]["oppu"]["per_user"] > 0
    md = rep.markdown
    assert "### Comparison" in md and "### Ablation" in md
    table = [line for line in md.splitlines() if line.startswith("| ")]
    for label in ("Base (Stage 1)", "RAG k=1", "OPPU", "TAP-PER P_q-only", "TAP-PER (full)", "-bridge"):
        assert any(label in line for line in table), (label, md)
    assert "comparison.png" in rep.images and all(p.startswith(b"\x89PNG") for p in rep.images.values())
    assert "![comparison](comparison.png)" in md
    # Dashboard: the report (plots inlined) + one image per plot; metadata has the numbers.
    assert len(art.visualizations) == 1 + len(rep.images)
    assert art.run_metadata["tap-per/accuracy"] == rep.metrics["variants"]["tap-per"]["accuracy"]
    # The report agrees with the evaluation report promotion used.
    ev = run.steps["report"].outputs["evaluation_report"][0].load()
    assert ev.variants == rep.metrics["variants"]
    # MLflow: the same files under comparison/ in the run's MLflow run.
    reg = run.steps["register_model"].outputs["registration"][0].load()
    files = {
        a.path
        for a in mlflow.MlflowClient(tracking_uri=reg["tracking_uri"]).list_artifacts(
            reg["mlflow_run_id"], "comparison"
        )
    }
    assert {"comparison/report.md", "comparison/comparison.png", "comparison/metrics.json"} <= files
