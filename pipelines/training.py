"""The `training` pipeline: files -> validated dataset -> splits -> cached vectors -> Stage 1 (merged)
-> Stage 2 (TAP-PER state) -> evaluation (base, tap-per, variants) -> report [-> comparison report]
-> registration -> promotion (-> serving bundle).

Each step receives only the config sections it depends on, so the step cache
does what one expects: changing a Stage-2 setting reruns Stage 2 and what
follows, while validated data, embeddings and Stage 1 are reused.

Comparison switch: `variants` names every method to evaluate on the same split
and Stage-1 backbone (TAP-PER ablations `no-bridge`, `no-pq`, `no-pu`,
`lambda-t0`, ..., `bm25-kN`, `L-N`; baselines `rag-kN`, `pag-kN`, `oppu`,
`oppu-rag`, `oppu-pag`, `pq-only`: tapper.methods); `compare: true` adds the
`comparison_report` step (tapper.analysis.report: Markdown tables with the best
per metric in bold + PNG plots, logged to MLflow, shown in the dashboard).
See configs/compare-tiny.yaml.
"""

from __future__ import annotations

from typing import Optional

from zenml import pipeline
from zenml.client import Client

from steps import (
    build_splits,
    cache_embeddings,
    comparison_report,
    evaluate_base,
    evaluate_tapper,
    evaluate_variant,
    load_data,
    promote,
    register_model,
    report,
    train_stage1,
    train_stage2,
    validate_data,
)
from steps.data import file_sha256


def _tracked(step_fn):
    """The step, using the active stack's experiment tracker when it has one. Every step is tracked, so the
    run's MLflow run opens with the first step and closes with the last: its duration is the pipeline's,
    and each step logs what it produces (losses, metrics) as it finishes."""
    tracker = Client().active_stack.experiment_tracker
    return step_fn.with_options(experiment_tracker=tracker.name) if tracker is not None else step_fn


def upstream(
    questions: str, outputs: str, task: Optional[str], backbone: str, run: dict, min_history: int, max_history: int
):
    """load -> validate -> splits -> embeddings -> Stage 1: the steps every pipeline shares.

    Invoked with the same names and parameters in every pipeline, so a second
    pipeline on the same data and settings gets them from the step cache.
    Returns (prepared_data, record_embeddings, stage1_backbone).
    """
    seed = int(run.get("seed", 0))
    # Hashes computed here (at compile time) key the load step's cache on file content.
    files = _tracked(load_data)(
        questions=questions,
        outputs=outputs,
        task=task,
        questions_sha256=file_sha256(questions),
        outputs_sha256=file_sha256(outputs),
    )
    dataset, _report = _tracked(validate_data)(files, min_history=min_history, max_history=max_history)
    data = _tracked(build_splits)(dataset, stage2_users=int(run.get("stage2_users", 100)))
    vectors = _tracked(cache_embeddings)(data, backbone=backbone, seed=seed)
    stage1 = _tracked(train_stage1)(data, backbone=backbone, stage1=run.get("stage1"), seed=seed)
    return data, vectors, stage1


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
    compare: bool = False,
    serving_dir: Optional[str] = None,
    promote_if: str = "better",
) -> None:
    """TAP-PER training on LaMP files; `run` is tapper's RunConfig as a dict (stage1/stage2/eval/stage2_users/seed)."""
    run = dict(run or {})
    seed = int(run.get("seed", 0))
    variants = list(variants or ["base", "tap-per"])
    data, vectors, stage1 = upstream(questions, outputs, task, backbone, run, min_history, max_history)
    state = _tracked(train_stage2)(stage1, data, vectors, stage2=run.get("stage2"), seed=seed, variant=candidate)
    evals = []
    for v in variants:
        if v == "base":
            evals.append(
                _tracked(evaluate_base)(
                    stage1, data, vectors, stage1=run.get("stage1"), eval=run.get("eval"), seed=seed
                )
            )
        elif v == candidate:
            evals.append(_tracked(evaluate_tapper)(stage1, state, data, vectors, eval=run.get("eval"), seed=seed))
        else:
            evals.append(_tracked(evaluate_variant)(v, stage1, data, vectors, run=run, id=f"evaluate_{v}"))
    if candidate not in variants:
        evals.append(_tracked(evaluate_tapper)(stage1, state, data, vectors, eval=run.get("eval"), seed=seed))
    rep = _tracked(report)(evals, stage1, data, candidate=candidate)
    if compare:
        _tracked(comparison_report)(evals, stage1, data, backbone=backbone, run=run)
    reg = _tracked(register_model)(rep, state, stage1, run=run, backbone=backbone, log_backbone=log_backbone, data=data)
    _tracked(promote)(rep, reg, data, state, stage1, run=run, serving_dir=serving_dir, promote_if=promote_if)
