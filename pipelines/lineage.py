"""Lineage of a model version: input files -> artifacts -> the model, from ZenML's records."""

from __future__ import annotations

from typing import Any

STEP_ORDER = [
    "load_data",
    "validate_data",
    "build_splits",
    "cache_embeddings",
    "train_stage1",
    "train_stage2",
    "evaluate_base",
    "evaluate_tapper",
    "report",
    "register_model",
    "promote",
]


def _model_version(name: str, version: str | None):
    from zenml.client import Client
    from zenml.enums import ModelStages

    client = Client()
    if version:
        return client.get_model_version(name, version)
    try:
        return client.get_model_version(name, ModelStages.PRODUCTION)
    except KeyError:
        return client.get_model_version(name, ModelStages.LATEST)


def _producer(av) -> dict[str, Any]:
    from zenml.client import Client

    out: dict[str, Any] = {}
    if getattr(av, "producer_step_run_id", None):
        sr = Client().get_run_step(av.producer_step_run_id)
        out = {"producer_step": sr.name, "producer_run": str(sr.pipeline_run_id)}
        try:
            out["producer_run_name"] = Client().get_pipeline_run(sr.pipeline_run_id).name
        except KeyError:
            pass
    return out


def lineage(model_name: str, version: str | None = None) -> dict[str, Any]:
    from zenml.client import Client

    mv = _model_version(model_name, version)
    meta = dict(mv.run_metadata or {})
    # The runs linked to the version (its model is set on the steps after validation, so the run is linked
    # through them rather than through a pipeline-level model).
    runs = [r.id for r in Client().list_pipeline_runs(linked_to_model_version_id=mv.id, sort_by="asc:created", size=50)]
    info: dict[str, Any] = {
        "model": model_name,
        "version": str(mv.number),
        "stage": getattr(mv.stage, "value", mv.stage),
        "primary_metric": meta.get("primary_metric"),
        "score": meta.get("candidate_score"),
        "promotion": meta.get("promotion"),
        "promotion_forced": meta.get("promotion_forced"),
        "mlflow": {k: meta[k] for k in ("mlflow_model", "mlflow_version", "mlflow_run_id") if k in meta},
        "runs": [str(r) for r in runs],
        "steps": [],
        "inputs": {},
        "data_quality": None,
    }
    if not runs:
        return info
    run = Client().get_pipeline_run(runs[-1])
    info["run"] = {"name": run.name, "id": str(run.id), "status": str(run.status.value)}
    names = sorted(run.steps, key=lambda n: (STEP_ORDER.index(n) if n in STEP_ORDER else 6.5, n))
    for n in names:
        s = run.steps[n]
        entry: dict[str, Any] = {"step": n, "status": str(s.status.value), "inputs": [], "outputs": []}
        for in_name, avs in (s.inputs or {}).items():
            for av in avs if isinstance(avs, list) else [avs]:
                entry["inputs"].append(
                    {"input": in_name, "artifact": av.artifact.name, "version": str(av.version), "id": str(av.id)}
                )
        for out_name, avs in (s.outputs or {}).items():
            for av in avs:
                entry["outputs"].append(
                    {"artifact": out_name, "version": str(av.version), "id": str(av.id), "uri": av.uri, **_producer(av)}
                )
        if n == "load_data":
            p = s.config.parameters
            info["inputs"] = {
                k: p.get(k) for k in ("questions", "outputs", "task", "questions_sha256", "outputs_sha256")
            }
        if n == "validate_data":
            for av in (s.outputs or {}).get("data_quality_report", []):
                m = av.run_metadata or {}
                info["data_quality"] = {
                    "verdict": m.get("verdict"),
                    "expectations": m.get("expectations"),
                    "failed": m.get("failed_expectations"),
                    "report": f"data_quality_report v{av.version}",
                }
        info["steps"].append(entry)
    return info


def print_lineage(info: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.tree import Tree

    c = Console()
    head = f"[bold]{info['model']}[/bold] version {info['version']}"
    if info.get("stage"):
        head += f" (stage: [bold]{info['stage']}[/bold])"
    if info.get("score") is not None:
        head += f"  {info.get('primary_metric')} = {info['score']:.4f}"
    tree = Tree(head)
    ins = info.get("inputs") or {}
    if ins:
        f = tree.add("input files")
        f.add(f"questions: {ins.get('questions')}  sha256 {str(ins.get('questions_sha256'))[:16]}…")
        f.add(f"outputs:   {ins.get('outputs')}  sha256 {str(ins.get('outputs_sha256'))[:16]}…")
        f.add(f"task: {ins.get('task') or '(from the outputs file)'}")
    dq = info.get("data_quality")
    if dq:
        tree.add(
            f"data quality: [bold]{dq['verdict']}[/bold] ({dq['expectations']} expectations, {dq['failed']} failed; "
            f"{dq['report']})"
        )
    if info.get("run"):
        r = tree.add(f"pipeline run {info['run']['name']} ({info['run']['id']}): {info['run']['status']}")
        for s in info["steps"]:
            node = r.add(f"[bold]{s['step']}[/bold] ({s['status']})")
            for o in s["outputs"]:
                src = ""
                if o.get("producer_run") and o["producer_run"] != info["run"]["id"]:
                    src = f"  (cached: produced by run {o.get('producer_run_name', o['producer_run'])})"
                node.add(f"-> {o['artifact']} v{o['version']} (id {o['id'][:8]}){src}")
    if info.get("mlflow"):
        m = info["mlflow"]
        tree.add(f"MLflow: model {m.get('mlflow_model')} v{m.get('mlflow_version')}, run {m.get('mlflow_run_id')}")
    p = info.get("promotion")
    if p:
        tree.add(f"promotion: {'promoted' if p.get('promoted') else 'not promoted'} — {p.get('reason')}")
    if info.get("promotion_forced"):
        tree.add(f"forced promotion: {info['promotion_forced'].get('reason')}")
    c.print(tree)
