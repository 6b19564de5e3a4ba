"""Model steps: cache record vectors, Stage 1 (task LoRA, merged), Stage 2 (TAP-PER prefix + bridge)."""

from __future__ import annotations

from typing import Annotated, Optional

from zenml import log_metadata, step
from zenml.logger import get_logger

from materializers.types import BackboneDir, EmbeddingTable, TapPerState
from steps._core import embedding_texts, install_embeddings, quiet, run_config, step_tempdir, train_tapper
from tapper.data.prepared import PreparedData

logger = get_logger(__name__)


def _loss_logger():
    """Each finished epoch: a log line, and the loss in the run's MLflow run (`loss/<stage>`, step = epoch)."""
    from steps._core import active_mlflow

    def log(stage: str, epoch: int, loss: float) -> None:
        logger.info("%s epoch %d: loss %.4f", stage, epoch + 1, loss)
        mlflow = active_mlflow()
        if mlflow is not None:
            mlflow.log_metric(f"loss/{stage}", float(loss), step=epoch + 1)

    return log


@step
def cache_embeddings(
    data: PreparedData, backbone: str, seed: int = 0
) -> Annotated[EmbeddingTable, "record_embeddings"]:
    """Mean frozen input-embedding vectors of every query and history record Stage 2 and evaluation use.

    Stage 1 trains attention projections only, so the merged backbone has the
    same input embeddings: the vectors computed here serve Stage 2 unchanged
    (the cache key is the embedding matrix's hash + the tokenizer's).
    """
    import torch

    from tapper.experiment import embedding_cache, open_backbone
    from tapper.model.embedding_cache import text_hash

    quiet()
    bb = open_backbone(backbone, data, seed)
    cache = embedding_cache(bb)
    texts = embedding_texts(data)
    vectors = cache.encode(texts, progress=True) if texts else torch.zeros(0, bb.hidden_size)
    table = EmbeddingTable(
        key=cache.key,
        vectors=vectors.float().contiguous(),
        index={text_hash(t): i for i, t in enumerate(texts)},
        backbone=backbone,
        computed=cache.stats.computed,
        reused=cache.stats.reused,
    )
    logger.info(
        "record embeddings: %d texts, %d computed, %d reused from %s",
        len(texts),
        table.computed,
        table.reused,
        cache.dir,
    )
    return table


@step
def train_stage1(
    data: PreparedData, backbone: str, stage1: Optional[dict] = None, seed: int = 0
) -> Annotated[BackboneDir, "stage1_backbone"]:
    """Task LoRA on q,k,v,o over the Stage-1 users, merged into the backbone (paper 2.1)."""
    from tapper.experiment import open_backbone, run_stage1

    quiet()
    cfg = run_config(data, seed, stage1=stage1)
    bb = open_backbone(backbone, data, seed, cfg.stage1.dtype)
    out = step_tempdir("tapper-stage1-") / "merged"
    res = run_stage1(bb, data, cfg, out, progress=True, log=_loss_logger())
    log_metadata(
        metadata={"stage1": {"losses": res.losses, "examples": res.n_examples, "weights_hash": res.weights_hash}}
    )
    return BackboneDir(
        path=res.path, spec=backbone, weights_hash=res.weights_hash, losses=list(res.losses), n_examples=res.n_examples
    )


@step
def train_stage2(
    stage1_backbone: BackboneDir,
    data: PreparedData,
    embeddings: EmbeddingTable,
    stage2: Optional[dict] = None,
    seed: int = 0,
    variant: str = "tap-per",
) -> Annotated[TapPerState, "tapper_state"]:
    """TAP-PER Stage 2 on the frozen merged backbone: user table, DIN unit, λ's, projection, bridge LoRA."""
    quiet()
    added = install_embeddings(embeddings)
    cfg = run_config(data, seed, stage2=stage2)
    state = train_tapper(
        variant, stage1_backbone.path, data, cfg, step_tempdir("tapper-state-") / variant, log=_loss_logger()
    )
    log_metadata(
        metadata={
            "stage2": {
                "losses": state.losses,
                "examples": state.n_train,
                "lambda_t": state.lambda_t,
                "lambda_o": state.lambda_o,
                "embeddings_installed": added,
            }
        }
    )
    return state
