"""The `training` pipeline: files -> validated dataset -> splits -> cached vectors -> Stage 1 (merged)
-> Stage 2 (TAP-PER state) -> evaluation (base, tap-per, variants) -> report -> registration -> promotion.

Each step receives only the config sections it depends on, so the step cache
does what one expects: changing a Stage-2 setting reruns Stage 2 and what
follows, while validated data, embeddings and Stage 1 are reused.
"""
from __future__ import annotations

from typing import Optional

from zenml import pipeline
from zenml.client import Client

from steps import (
    build_splits, cache_embeddings, evaluate_base, evaluate_tapper, evaluate_variant, load_data, promote,
    register_model, report, train_stage1, train_stage2, validate_data,
)
from steps.data import file_sha256


def _tracked(step_fn):
    """The step, using the active stack's experiment tracker when it has one."""
    tracker = Client().active_stack.experiment_tracker
    return step_fn.with_options(experiment_tracker=tracker.name) if tracker is not None else step_fn


@pipeline(name="training", enable_cache=True)
def training(
    questions: str,
    outputs: str,
    task: Optional[str] = None,
    backbone: str = "smollm2",
    run: Optional[dict] = None,
    variants: Optional[list] = None,
    candidate: str = "tap-per",
    min_history: int = 1,
    max_history: int = 100_000,
    log_backbone: bool = False,
) -> None:
    """TAP-PER training on LaMP files; `run` is tapper's RunConfig as a dict (stage1/stage2/eval/stage2_users/seed)."""
    run = dict(run or {})
    seed = int(run.get("seed", 0))
    variants = list(variants or ["base", "tap-per"])
    # Hashes computed here (at compile time) key the load step's cache on file content.
    files = load_data(questions=questions, outputs=outputs, task=task,
                      questions_sha256=file_sha256(questions), outputs_sha256=file_sha256(outputs))
    dataset, _report = validate_data(files, min_history=min_history, max_history=max_history)
    data = build_splits(dataset, stage2_users=int(run.get("stage2_users", 100)))
    vectors = cache_embeddings(data, backbone=backbone, seed=seed)
    stage1 = train_stage1(data, backbone=backbone, stage1=run.get("stage1"), seed=seed)
    state = train_stage2(stage1, data, vectors, stage2=run.get("stage2"), seed=seed, variant=candidate)
    evals = []
    for v in variants:
        if v == "base":
            evals.append(evaluate_base(stage1, data, vectors, stage1=run.get("stage1"), eval=run.get("eval"), seed=seed))
        elif v == candidate:
            evals.append(evaluate_tapper(stage1, state, data, vectors, eval=run.get("eval"), seed=seed))
        else:
            evals.append(evaluate_variant(v, stage1, data, vectors, run=run, id=f"evaluate_{v}"))
    if candidate not in variants:
        evals.append(evaluate_tapper(stage1, state, data, vectors, eval=run.get("eval"), seed=seed))
    rep = report(evals, stage1, data, candidate=candidate)
    reg = _tracked(register_model)(rep, state, stage1, run=run, backbone=backbone, log_backbone=log_backbone)
    _tracked(promote)(rep, reg, data, run=run)
