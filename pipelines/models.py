"""`tapper models [NAME]`: every version of a tapper model with its stage, MLflow version and aliases, primary
metric, and promotion decision and date, from ZenML's Model Control Plane and the MLflow registry.

The open-source ZenML dashboard does not show the Model Control Plane (its Models tab is a paid-plan page),
so this is where a user sees which version is in production and why.
"""

from __future__ import annotations

from typing import Any


class ModelsError(LookupError):
    pass


def tapper_models() -> list[str]:
    from zenml.client import Client

    return sorted(m.name for m in Client().list_models(size=100) if m.name.startswith("tapper"))


def _mlflow_versions(name: str) -> dict[str, dict[str, Any]]:
    """{MLflow version: {"aliases", "tags"}} of the registered model `name`; empty without an MLflow registry."""
    from zenml.client import Client

    tracker = Client().active_stack.experiment_tracker
    if tracker is None or tracker.flavor != "mlflow":
        return {}
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracker.get_tracking_uri())
    try:
        found = client.search_model_versions(f"name = '{name}'")
    except Exception:  # noqa: BLE001 - no such registered model (e.g. a run without MLflow)
        return {}
    out = {}
    for v in found:  # a search leaves the aliases out; a get has them
        full = client.get_model_version(name, v.version)
        out[str(v.version)] = {"aliases": list(full.aliases or []), "tags": dict(full.tags or {})}
    return out


def _when(value: Any) -> str:
    if not value:
        return ""
    text = value.isoformat() if hasattr(value, "isoformat") else str(value)
    return text.replace("T", " ")[:16]


def model_versions(name: str) -> list[dict[str, Any]]:
    """One dict per version, newest first."""
    from zenml.client import Client

    client = Client()
    try:
        client.get_model(name)
    except KeyError:
        known = tapper_models()
        raise ModelsError(
            f"no model named {name!r}; models: {', '.join(known) or 'none yet (run `tapper train`)'}"
        ) from None
    mlflow_versions = _mlflow_versions(name)
    rows = []
    for mv in client.list_model_versions(model=name, sort_by="desc:number", size=100, hydrate=True):
        meta = dict(mv.run_metadata or {})
        promo, forced = meta.get("promotion") or {}, meta.get("promotion_forced") or {}
        mlv = meta.get("mlflow_version")
        ml = mlflow_versions.get(str(mlv), {}) if mlv is not None else {}
        if forced:
            decision, reason, when = "forced", forced.get("reason", ""), forced.get("decided_at")
        elif promo:
            decision = "promoted" if promo.get("promoted") else "not promoted"
            reason, when = promo.get("reason", ""), promo.get("decided_at")
        else:
            decision, reason, when = "no decision", "the run did not reach the promotion step", None
        stage = getattr(mv.stage, "value", mv.stage)
        rows.append(
            {
                "version": str(mv.number),
                "stage": str(stage) if stage else "",
                "created": _when(mv.created),
                "metric": meta.get("primary_metric"),
                "score": meta.get("candidate_score"),
                "eval_queries": meta.get("eval_queries"),
                "mlflow_version": None if mlv is None else str(mlv),
                "mlflow_aliases": ml.get("aliases", []),
                "decision": decision,
                "reason": reason,
                "decided_at": _when(when) if when else "",
            }
        )
    return rows


def print_models(name: str, rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # a pipe or a log: no 80-column squeeze
        console = Console(width=160)
    metric = next((r["metric"] for r in rows if r["metric"]), "metric")
    table = Table(title=f"{name}: versions (ZenML Model Control Plane + MLflow registry)")
    for col in ("version", "stage", metric, "queries", "MLflow version: aliases", "promotion", "decided", "created"):
        table.add_column(col, justify="right" if col in (metric, "queries") else "left")
    for r in rows:
        score = f"{r['score']:.4f}" if isinstance(r["score"], (int, float)) else ""
        ml = (
            f"v{r['mlflow_version']}" + (f": {', '.join(r['mlflow_aliases'])}" if r["mlflow_aliases"] else "")
            if r["mlflow_version"]
            else ""
        )
        stage = f"[bold green]{r['stage']}[/bold green]" if r["stage"] == "production" else r["stage"]
        table.add_row(
            r["version"], stage, score, str(r["eval_queries"] or ""), ml, r["decision"], r["decided_at"], r["created"]
        )
    console.print(table)
    for r in rows:
        if r["reason"] and r["decision"] != "no decision":
            console.print(f"  v{r['version']}: {r['reason']}", soft_wrap=True)
    if not rows:
        console.print("no versions yet")
