"""`metrics.json`, the record of one experiment (`tapper experiment`, and the pipeline's comparison report), typed.

    task, backbone              what ran
    variants                    {variant: {metric: value}}, the table every report reads
    per_user_params, shared_params   of the run's main TAP-PER model (tap-per, else the first with per-user state)
    params                      {variant: {"per_user", "shared"}}
    details                     {variant: {"seconds", "losses", ...what the method recorded}}
    data                        counts: users, stage1_users, stage2_users, stage1_examples, stage2_examples,
                                eval_queries
    stage1                      {"losses", "weights_hash"} of the merged Stage-1 backbone
    config                      the RunConfig as a dict
    seconds                     wall time so far
    files                       {"questions", "outputs"} the run scored (absent for pipeline runs)
    pending                     variants not done yet: the file is rewritten after each variant
    groups                      {variant: {group: {metric: value, "n"}}} when user groups were given
    paired                      paired differences per query (tapper.experiment.paired_comparisons)

Both writers build it here, so `tapper report`, the dashboard's comparison report and the sweeps read one shape;
`read_metrics` names the file and the field that does not fit.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

DATA_COUNTS = ("users", "stage1_users", "stage2_users", "stage1_examples", "stage2_examples", "eval_queries")


class MetricsFileError(ValueError):
    pass


@dataclass
class ExperimentMetrics:
    task: str
    backbone: str
    variants: dict[str, dict[str, float]]
    per_user_params: int
    shared_params: int
    params: dict[str, dict[str, int]]
    details: dict[str, dict]
    data: dict[str, int]
    stage1: dict[str, Any]
    config: dict
    seconds: float
    files: dict[str, str] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)
    groups: dict[str, dict] = field(default_factory=dict)
    paired: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [k for k in DATA_COUNTS if k not in self.data]
        if missing:
            raise MetricsFileError(f"field 'data' lacks {missing}")
        for name, values in self.variants.items():
            bad = [m for m, v in values.items() if not isinstance(v, (int, float))]
            if bad:
                raise MetricsFileError(f"field 'variants.{name}': metrics {bad} are not numbers")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for optional in ("files", "groups"):
            if not out[optional]:
                del out[optional]
        return out


def experiment_metrics(
    *,
    task: str,
    backbone: str,
    results: Mapping[str, Any],
    data,
    stage1_losses: list[float],
    stage1_examples: int,
    weights_hash: str,
    config: dict,
    seconds: float,
    files: dict | None = None,
    pending: list[str] | None = None,
    groups: dict | None = None,
    paired: dict | None = None,
) -> ExperimentMetrics:
    """The record of `results` ({variant: tapper.methods.result.VariantResult}) on `data` (PreparedData)."""
    main = results.get("tap-per") or next((r for r in results.values() if r.per_user_params), None)
    s = data.splits
    return ExperimentMetrics(
        task=task,
        backbone=backbone,
        variants={k: {m: float(v) for m, v in r.metrics.items()} for k, r in results.items()},
        per_user_params=main.per_user_params if main else 0,
        shared_params=main.shared_params if main else 0,
        params={k: {"per_user": r.per_user_params, "shared": r.shared_params} for k, r in results.items()},
        details={k: {"seconds": round(r.seconds, 2), "losses": list(r.losses), **r.extra} for k, r in results.items()},
        data={
            "users": data.n_users,
            "stage1_users": len(s.stage1_users),
            "stage2_users": len(s.stage2_users),
            "stage1_examples": stage1_examples,
            "stage2_examples": len(s.stage2_train),
            "eval_queries": len(s.eval),
        },
        stage1={"losses": list(stage1_losses), "weights_hash": weights_hash},
        config=dict(config),
        seconds=round(seconds, 2),
        files=dict(files or {}),
        pending=list(pending or []),
        groups=dict(groups or {}),
        paired=dict(paired or {}),
    )


def metrics_from_dict(obj: Any, where: str = "metrics.json") -> ExperimentMetrics:
    if not isinstance(obj, dict):
        raise MetricsFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    fields = {f.name: f for f in dataclasses.fields(ExperimentMetrics)}
    required = [
        n for n, f in fields.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [k for k in required if k not in obj]
    unknown = sorted(set(obj) - set(fields))
    if missing or unknown:
        raise MetricsFileError(
            f"{where}: "
            + "; ".join(
                ([f"missing field(s) {missing}"] if missing else [])
                + ([f"unknown field(s) {unknown}"] if unknown else [])
            )
        )
    try:
        return ExperimentMetrics(**obj)
    except MetricsFileError as err:
        raise MetricsFileError(f"{where}: {err}") from None


def read_metrics(path: str | Path) -> ExperimentMetrics:
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MetricsFileError(f"{path}: not valid JSON: {err}") from None
    return metrics_from_dict(obj, str(path))
