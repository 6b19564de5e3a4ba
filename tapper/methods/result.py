"""The one result type every method returns, and how predictions are scored against the evaluation golds."""

from __future__ import annotations

from dataclasses import dataclass, field

from tapper.data.prepared import PreparedData
from tapper.data.types import Example
from tapper.eval.metrics import compute_metrics, per_query_scores


@dataclass
class VariantResult:
    """One method evaluated on the evaluation split: LaMP-format predictions {query id: text}, the task's
    metrics, the parameter counts (per user, shared) and what training recorded."""

    name: str
    predictions: dict[str, str]
    metrics: dict[str, float]
    per_user_params: int = 0
    shared_params: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    task: str = ""  # the task's name; filled by the caller that knows it (the pipeline's artifacts carry it)


def _golds(data: PreparedData, examples: list[Example] | None) -> dict[str, str]:
    return {ex.id: ex.target for ex in (examples if examples is not None else data.splits.eval)}


def score(data: PreparedData, preds: dict[str, str], examples: list[Example] | None = None) -> dict[str, float]:
    golds = _golds(data, examples)
    return compute_metrics(data.task, {k: preds[k] for k in golds}, golds)


def query_scores(data: PreparedData, preds: dict[str, str], examples: list[Example] | None = None) -> dict[str, float]:
    """Each query's share of the primary metric (tapper.eval.metrics.per_query_scores), for paired comparisons."""
    golds = _golds(data, examples)
    return per_query_scores(data.task, {k: preds[k] for k in golds}, golds)
