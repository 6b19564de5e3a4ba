"""Artifact types that only the workflow has (the ML core's own types are stored as they are).

Each type here is plain data (paths, numbers, strings) so that its
materializer can store it as JSON / safetensors / an HF directory — never a
pickle — and show it in the ZenML dashboard.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from tapper.methods.result import VariantResult  # noqa: F401  (an artifact type, re-exported)


@dataclass
class LampFiles:
    """The input files exactly as read: raw bytes, where they came from, their hashes.

    Nothing is parsed yet, so that a broken file is reported by the data-quality
    step (with a report) instead of crashing the loader.
    """

    questions_name: str
    outputs_name: str
    questions_bytes: bytes
    outputs_bytes: bytes
    questions_sha256: str
    outputs_sha256: str
    task: str | None = None  # as requested (--task); None = from the outputs file

    def meta(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not k.endswith("_bytes")}


@dataclass
class EmbeddingTable:
    """Record and query vectors of one backbone's frozen input embeddings (tapper.model.embedding_cache).

    `key` is the cache's content address (embedding hash + tokenizer hash);
    `index` maps text hashes to rows of `vectors` ([n, d] float32).
    """

    key: str
    vectors: "object"  # torch.Tensor; typed loosely so that importing this module stays light
    index: dict[str, int]
    backbone: str
    computed: int = 0
    reused: int = 0

    @property
    def n(self) -> int:
        return len(self.index)


@dataclass
class BackboneDir:
    """A backbone as a Hugging Face directory (safetensors + tokenizer): the merged Stage-1 model."""

    path: Path
    spec: str
    weights_hash: str
    losses: list[float] = field(default_factory=list)
    n_examples: int = 0


@dataclass
class TapPerState:
    """A trained TAP-PER prefix state: `prefix.safetensors` + `tapper_config.json` in `path`."""

    path: Path
    variant: str
    backbone_hash: str
    users: int
    per_user_params: int
    shared_params: int
    losses: list[float] = field(default_factory=list)
    n_train: int = 0
    lambda_t: float = 0.0
    lambda_o: float = 0.0
    seconds: float = 0.0


# One method's evaluation is the core's result type (tapper.methods.result.VariantResult), stored as JSON by
# materializers.evaluation.VariantResultMaterializer.


@dataclass
class EvalReport:
    """All variants of one run side by side, with what promotion compares."""

    task: str
    primary_metric: str
    higher_is_better: bool
    candidate: str  # the variant that is the run's model (tap-per)
    eval_data_hash: str
    eval_queries: int
    variants: dict[str, dict[str, float]]
    params: dict[str, dict[str, int]]
    losses: dict[str, list[float]]  # "stage1", and each Stage-2 variant
    mlflow: dict = field(default_factory=dict)  # run id, registered model name/version
    # The candidate's share of the primary metric on each evaluation query (tapper.eval.metrics.per_query_scores),
    # so that promotion can pair it with the production version on the same queries. Empty in older reports.
    candidate_per_query: dict[str, float] = field(default_factory=dict)
    # Every variant against the base and the candidate against every other variant, paired on the same queries
    # (tapper.experiment.paired_comparisons: metric, higher_is_better, pairs {"a - b": {"all": stats}}).
    paired: dict = field(default_factory=dict)
    # What the labels alone score on these queries (classification): the best constant answer, and each
    # user's most frequent label in their history; {name: {"score", "what"}}. Empty for other tasks.
    references: dict = field(default_factory=dict)

    @property
    def candidate_score(self) -> float:
        return float(self.variants[self.candidate][self.primary_metric])


@dataclass
class PromotionDecision:
    model_name: str
    model_version: str
    promoted: bool
    reason: str
    metric: str
    higher_is_better: bool
    candidate_score: float
    production_version: str | None = None
    production_score: float | None = None
    forced: bool = False
    archived_version: str | None = None
    mlflow_model: str | None = None
    mlflow_version: str | None = None
    bundle_path: str | None = None  # the serving bundle exported on promotion (deploy.bundle)
    serving_link: str | None = None  # the `current` symlink pointing at it (deploy.bundle.publish_bundle)
    bundle_error: str | None = None  # why no bundle was exported, if exporting failed
    # Candidate minus production on the same evaluation queries (tapper.eval.paired.paired_difference: mean,
    # 95 % paired-bootstrap interval, queries, wins), when both sides' per-query scores are known. The gate
    # uses it only with promote_if="significantly-better".
    paired: dict | None = None
    promote_if: str = "better"  # the gate: "better", or "significantly-better" (the paired interval excludes 0)
    decided_at: str | None = None  # when the decision was made (UTC, ISO 8601)


@dataclass
class OnlineTrajectories:
    """The online-adaptation simulation's result: `trajectories.json` (tapper.online.trajectories_report's
    object: metric, fractions, methods {name: [R_0..R_T]}, all_metrics, cost, split, ...) and its
    Figure-6-style plot as PNG bytes."""

    report: dict
    png: bytes = b""

    @property
    def methods(self) -> dict[str, list[float]]:
        return self.report["methods"]


@dataclass
class ComparisonReport:
    """tapper.analysis.report.write_report's output for one run: report.md, its PNGs, and the metrics it was made
    from."""

    task: str
    markdown: str
    images: dict[str, bytes]  # file name (as report.md links it) -> PNG bytes
    metrics: dict  # tapper.experiment's metrics.json contract
