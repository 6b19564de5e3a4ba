"""ZenML steps: thin, typed wrappers around `tapper`, one concern each.

Every output is `Annotated[..., "name"]`, so each artifact has a stable name in
lineage: lamp_files -> lamp_dataset (+ data_quality_report) -> prepared_data ->
record_embeddings -> stage1_backbone -> tapper_state -> eval_<variant> ->
evaluation_report (+ comparison_report) -> promotion_decision (+ serving bundle);
the online_adaptation pipeline: ... stage1_backbone -> online_bootstrap_state -> online_trajectory
(one per method) -> online_trajectories.
"""

import materializers  # noqa: F401  (registers our materializers)
from steps._core import silence_known_noise
from steps.data import build_splits, load_data, validate_data
from steps.evaluate import comparison_report, evaluate_base, evaluate_tapper, evaluate_variant, report
from steps.model import cache_embeddings, train_stage1, train_stage2
from steps.online import online_bootstrap, online_method, online_report
from steps.promote import promote
from steps.register import register_model

silence_known_noise()

__all__ = [
    "load_data",
    "validate_data",
    "build_splits",
    "cache_embeddings",
    "train_stage1",
    "train_stage2",
    "evaluate_base",
    "evaluate_tapper",
    "evaluate_variant",
    "report",
    "register_model",
    "promote",
    "online_bootstrap",
    "online_method",
    "online_report",
    "comparison_report",
]
