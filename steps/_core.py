"""Glue between the steps and tapper's core: Stage-2 training and evaluation of TAP-PER as separate, cacheable
steps (tapper.methods.tap_per's train_tapper_variant and predict_eval, the calls its `train_and_evaluate` makes),
the embedding cache fed from an artifact, and the step-side helpers (temporary dirs, MLflow, quiet logs).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from materializers.types import EmbeddingTable, TapPerState
from tapper.config import RunConfig, load_run_config
from tapper.data.prepared import PreparedData
from tapper.methods.result import VariantResult


def run_config(data: PreparedData | None = None, seed: int = 0, **sections: dict) -> RunConfig:
    """A RunConfig from just the sections a step receives (the others keep their defaults)."""
    d = {k: v for k, v in sections.items() if v is not None}
    if data is not None:
        d["stage2_users"] = len(data.splits.stage2_users)
    d["seed"] = seed
    return load_run_config(d)


def step_tempdir(prefix: str) -> Path:
    """A temporary directory removed when the current step ends (after its outputs are stored)."""
    path = tempfile.mkdtemp(prefix=prefix)
    try:
        from zenml import get_step_context

        get_step_context()._cleanup_registry.register_callback(lambda: shutil.rmtree(path, ignore_errors=True))
    except Exception:  # noqa: BLE001 - outside a step (or a ZenML without the registry): leave it to the OS
        pass
    return Path(path)


def embedding_texts(data: PreparedData) -> list[str]:
    """Every text Stage 2 and evaluation embed: query inputs and history records (unique, stable order)."""
    task, seen = data.task, {}
    for ex in data.splits.stage2_train + data.splits.eval:
        seen.setdefault(ex.input, None)
        for r in ex.history:
            seen.setdefault(task.record_text(r), None)
    return list(seen)


def install_embeddings(table: EmbeddingTable) -> int:
    """Put an embedding artifact's vectors into this machine's content-addressed cache.

    Appends to the cache's own store (tapper.model.embedding_cache.VectorStore) so
    that Stage 2 and evaluation, on any machine, find every vector already computed.
    Returns the number of vectors added.
    """
    import torch

    from tapper.model.embedding_cache import VectorStore
    from tapper.paths import cache_dir

    store = VectorStore(cache_dir() / "embeddings" / table.key, int(table.vectors.shape[1]))
    known = store.known()
    missing = [(h, r) for h, r in table.index.items() if h not in known]
    if missing:
        store.append([h for h, _ in missing], table.vectors[torch.tensor([r for _, r in missing], dtype=torch.long)])
    return len(missing)


def train_tapper(
    variant: str, stage1_dir: Path, data: PreparedData, cfg: RunConfig, state_dir: Path, progress: bool = True, log=None
) -> TapPerState:
    """Stage 2 of one TAP-PER variant on the merged backbone; saves TapPer state to `state_dir`."""
    from tapper.methods.tap_per import train_tapper_variant

    t0 = time.time()
    _, result = train_tapper_variant(variant, stage1_dir, data, cfg, progress, log)
    model = result.model
    model.save(state_dir)
    return TapPerState(
        path=Path(state_dir),
        variant=variant,
        backbone_hash=model.backbone_hash,
        users=len(model.user_ids),
        per_user_params=model.per_user_params(),
        shared_params=model.shared_params(),
        losses=list(result.losses),
        n_train=result.n_examples,
        lambda_t=float(model.prefix.lambda_t.detach()),
        lambda_o=float(model.prefix.lambda_o.detach()),
        seconds=time.time() - t0,
    )


def evaluate_state(
    state: TapPerState, stage1_dir: Path, data: PreparedData, cfg: RunConfig, progress: bool = True
) -> VariantResult:
    """Load a saved TAP-PER state on the merged backbone and evaluate it on the evaluation split."""
    from tapper.methods.tap_per import evaluate_saved

    t0 = time.time()
    preds, metrics = evaluate_saved(state.path, stage1_dir, data, cfg, state.variant, progress)
    return VariantResult(
        name=state.variant,
        task=data.task.name,
        metrics=metrics,
        predictions=preds,
        per_user_params=state.per_user_params,
        shared_params=state.shared_params,
        losses=state.losses,
        seconds=state.seconds + time.time() - t0,
        extra={"lambda_t": state.lambda_t, "lambda_o": state.lambda_o, "n_train": state.n_train},
    )


def variant_eval(res: VariantResult, task: str) -> VariantResult:
    """The result as the pipeline stores it: with its task's name."""
    import dataclasses

    return dataclasses.replace(res, task=task)


def eval_data_hash(data: PreparedData) -> str:
    """Identity of the evaluation data: task + (query id, gold) pairs + what the model sees of each query."""
    import hashlib

    h = hashlib.sha256(data.task.name.encode())
    for ex in sorted(data.splits.eval, key=lambda e: e.id):
        h.update(f"\0{ex.id}\0{ex.user_id}\0{ex.target}\0{ex.input}\0{len(ex.history)}".encode())
    return h.hexdigest()


def active_mlflow():
    """The mlflow module when the current step runs inside an MLflow run (an MLflow tracker on the stack), else None."""
    from zenml.client import Client

    tracker = Client().active_stack.experiment_tracker
    if tracker is None or tracker.flavor != "mlflow":
        return None
    import mlflow

    return mlflow if mlflow.active_run() is not None else None


def quiet() -> None:
    """Offline, known third-party warnings off, and progress as log lines (tapper.progress): a step's
    output goes to the dashboard's step logs, where a bar's redraws would be red ERROR rows."""
    from tapper.progress import log_lines
    from tapper.quiet import quiet as quiet_env

    quiet_env()
    log_lines(True)


class _DropMessage:
    """A logging filter that drops one exact message."""

    def __init__(self, message: str):
        self.message = message

    def filter(self, record) -> bool:
        return record.getMessage() != self.message


def silence_known_noise() -> None:
    """ZenML 0.98's MLflow tracker turns off MLflow autologging for eight frameworks after every tracked step;
    MLflow 3.17 has no `mlflow.fastai` any more, so every step would log this one line. Only that exact
    line is dropped: any other framework failing to turn off is still reported."""
    import logging

    name = "zenml.integrations.mlflow.experiment_trackers.mlflow_experiment_tracker"
    logging.getLogger(name).addFilter(
        _DropMessage("Failed to disable MLflow autologging for the following frameworks: ['fastai'].")
    )
