"""What a registered model version says about itself: its evaluation as a table and a Markdown description.

Read from the run's evaluation report (materializers.types.EvalReport, by its fields: task, candidate,
candidate_score, primary_metric, variants, paired, references, eval_queries, eval_data_hash).
"""

from __future__ import annotations


def evaluation_table(report) -> dict[str, list]:
    """The evaluation as columns (MLflow's table format): one row per variant, its metrics and its paired
    difference in the primary metric to the base (mean and 95 % interval)."""
    names = list(report.variants)
    metrics = list(next(iter(report.variants.values())).keys()) if names else []
    pairs = (report.paired or {}).get("pairs", {})
    table: dict[str, list] = {"variant": names}
    for m in metrics:
        table[m] = [round(float(report.variants[v][m]), 6) for v in names]
    vs_base = [pairs.get(f"{v} - base", {}).get("all") for v in names]
    table[f"{report.primary_metric} - base"] = [None if st is None else round(st["mean"], 6) for st in vs_base]
    table["95% interval"] = [None if st is None else f"[{st['ci95'][0]:+.3f}, {st['ci95'][1]:+.3f}]" for st in vs_base]
    table["queries"] = [report.eval_queries] * len(names)
    return table


def model_description(report, backbone: str, zenml_version: str, table: dict[str, list]) -> str:
    """The MLflow model version's description: what it is, on what it was evaluated, and the evaluation table."""
    cols = list(table)
    lines = [
        f"TAP-PER ({report.candidate}) for {report.task} on the {backbone or 'configured'} backbone; ZenML model "
        f"version {zenml_version}. Primary metric {report.primary_metric} = {report.candidate_score:.4f} on "
        f"{report.eval_queries} evaluation queries (data hash {report.eval_data_hash[:12]}).",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + " --- |" * len(cols),
    ]
    for i in range(len(table["variant"])):
        lines.append("| " + " | ".join("" if table[c][i] is None else str(table[c][i]) for c in cols) + " |")
    refs = "; ".join(f"{v['what']}: {v['score']:.4f}" for v in (report.references or {}).values())
    if refs:
        lines += ["", f"Reference (labels alone): {refs}."]
    lines += [
        "",
        "Input: LaMP questions (id, input, user_id, profile records); output: the answer text. "
        "Artifacts: tapper_state/ (prefix table, DIN, bridge), backbone.json (where the merged Stage-1 backbone is).",
    ]
    return "\n".join(lines)
