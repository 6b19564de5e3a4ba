"""Stage 2: prefix learning (user table, DIN attention, projection, λ's) + bridge LoRA (paper 2.2)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from tapper.config import Stage2Config
from tapper.data.types import Example
from tapper.model.embedding_cache import EmbeddingCache
from tapper.model.tapper import TapPer
from tapper.precision import needs_loss_scaling
from tapper.train.features import EncodedSet, FeatureEncoder, loss_tokens
from tapper.train.loop import set_seed, train_epochs


@dataclass
class Stage2Result:
    model: TapPer
    losses: list[float]
    n_examples: int
    # With validation_share > 0: the primary metric on the held-out examples after each epoch, and the epoch kept.
    validation: list[float] = field(default_factory=list)
    best_epoch: int | None = None


def hold_out(examples: list[Example], share: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, validation): a seeded `share` of the examples, drawn across users, never a user's only example."""
    if share <= 0:
        return examples, []
    rng = random.Random(f"validation-{seed}")
    per_user: dict[str, int] = {}
    for ex in examples:
        per_user[ex.user_id] = per_user.get(ex.user_id, 0) + 1
    candidates = [i for i, ex in enumerate(examples) if per_user[ex.user_id] > 1]
    held = set(rng.sample(candidates, min(len(candidates), round(share * len(examples)))))
    return [ex for i, ex in enumerate(examples) if i not in held], [ex for i, ex in enumerate(examples) if i in held]


class EpochSelector:
    """Scores the model on held-out Stage-2 examples after each epoch and keeps a copy of the best epoch's
    trainable state (prefix encoder and bridge), restored at the end: the epochs a small dataset can bear
    are found on data, not guessed."""

    def __init__(self, model: TapPer, task, tokenizer, encoded: EncodedSet, batch_size: int):
        self.model, self.task, self.tok, self.encoded, self.batch_size = model, task, tokenizer, encoded, batch_size
        self.scores: list[float] = []
        self.best: tuple[float, int, dict] | None = None

    def __call__(self, epoch: int, loss: float) -> None:
        from tapper.eval.metrics import compute_metrics
        from tapper.eval.predict import generate_texts

        was_training = self.model.training
        preds = generate_texts(self.model, self.encoded, self.tok, self.task, self.batch_size, progress=False)
        golds = {it.id: it.target for it in self.encoded.items}
        value = compute_metrics(self.task, preds, golds)[self.task.primary_metric]
        self.scores.append(value)
        key = value if self.task.higher_is_better else -value
        if self.best is None or key > self.best[0]:
            state = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
            self.best = (key, epoch, state)
        self.model.train(was_training)

    def restore(self) -> int | None:
        if self.best is None:
            return None
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, v in self.best[2].items():
                params[n].copy_(v)
        return self.best[1]


def limit_per_user(examples: list[Example], k: int | None) -> list[Example]:
    """Keep each user's k most recent training examples (examples arrive chronologically per user)."""
    if not k:
        return examples
    by_user: dict[str, list[Example]] = {}
    for ex in examples:
        by_user.setdefault(ex.user_id, []).append(ex)
    keep = {id(ex) for exs in by_user.values() for ex in exs[-k:]}
    return [ex for ex in examples if id(ex) in keep]


def encoder_for(model: TapPer, task, tokenizer, cache: EmbeddingCache) -> FeatureEncoder:
    cfg = model.cfg
    return FeatureEncoder(task, tokenizer, cache, max_len=cfg.max_len, prefix_len=cfg.prefix_len, bm25_k=cfg.bm25_k)


def param_groups(
    model: TapPer, cfg: Stage2Config, which: tuple[str, ...] = ("user_table", "shared", "lambdas", "bridge")
) -> list[dict]:
    groups = model.trainable_parameters()
    rates = {"lambdas": cfg.lambda_lr, "user_table": cfg.user_lr or cfg.lr}
    decay = {"user_table": cfg.user_weight_decay}
    # The user table is updated row-sparsely (tapper.train.row_adam): a row moves, and decays, only when its user is
    # in the batch.
    return [
        {"params": groups[k], "lr": rates.get(k, cfg.lr), "weight_decay": decay.get(k, 0.0), "rows": k == "user_table"}
        for k in which
    ]


class AnswerReadout(nn.Module):
    """Auxiliary objective (`Stage2Config.aux_weight`): a linear readout of the attention-pooled history P_q reads
    must predict the example's answer among the task's labels.

    The LM's loss reaches the DIN attention only through the projection, the backbone and the bridge, a long and
    weak path; this one reaches it directly, so the attention learns early which records bear on a query (for
    LaMP-2: those labelled with one of the categories the article could have). Used in training only; the
    readout is not part of the saved model."""

    def __init__(self, model: TapPer, labels: tuple[str, ...]):
        super().__init__()
        self.index = {label: i for i, label in enumerate(labels)}
        self.head = nn.Linear(model.d, len(labels)).to(model.plm.device)

    def loss(self, model: TapPer, items) -> torch.Tensor:
        pooled = model.prefix.last_pooled
        known = [i for i, it in enumerate(items) if it.target in self.index]
        if not known:
            return pooled.sum() * 0.0
        y = torch.tensor([self.index[items[i].target] for i in known], device=pooled.device)
        return nn.functional.cross_entropy(self.head(pooled[known]), y)


def fit(
    model: TapPer,
    encoded: EncodedSet,
    pad_id: int,
    cfg: Stage2Config,
    epochs: float,
    seed: int,
    which=("user_table", "shared", "lambdas", "bridge"),
    progress=True,
    desc="stage 2 (prefix + bridge)",
    on_epoch: Callable[[int, float], None] | None = None,
    aux: AnswerReadout | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train the named parameter groups of `model` on `encoded` (Stage 2 and online updates share this)."""
    model.train()
    groups = param_groups(model, cfg, which)
    use_aux = aux is not None and cfg.aux_weight > 0 and cfg.use_pq and "shared" in which
    if use_aux:
        groups.append({"params": list(aux.parameters()), "lr": cfg.lr, "weight_decay": 0.0})

    # The vectors live on the model's device for the whole fit: a step gathers its [B, N, d] history from them
    # through index tensors (tapper.train.features.prefix_inputs) instead of building it on the host and copying it.
    vectors = encoded.vectors.to(model.plm.device)

    def loss_fn(batch):
        loss = model.loss(batch, vectors, pad_id)
        return loss + cfg.aux_weight * aux.loss(model, batch) if use_aux else loss

    losses = train_epochs(
        encoded.items,
        loss_fn,
        groups,
        epochs,
        cfg.batch_size,
        seed=seed,
        desc=desc,
        progress=progress,
        on_epoch=on_epoch,
        warmup=cfg.warmup,
        schedule=cfg.schedule,
        # Micro-batches are weighted by target tokens, exact for the LM loss; the auxiliary readout's mean is
        # then weighted the same way, close to (not exactly) its full-batch mean.
        micro_batch_size=cfg.micro_batch_size,
        weight_fn=loss_tokens,
        loss_scaling=needs_loss_scaling(cfg.dtype),
        on_step=on_step,
    )
    model.eval()
    return losses


def train_stage2(
    backbone: nn.Module,
    tokenizer,
    task,
    examples: list[Example],
    users: list[str],
    cfg: Stage2Config,
    cache: EmbeddingCache,
    seed: int = 0,
    backbone_hash: str = "",
    progress: bool = True,
    on_epoch: Callable[[int, float], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> Stage2Result:
    set_seed(seed)
    examples = limit_per_user(examples, cfg.max_examples_per_user)
    if not examples:
        raise ValueError(f"{task.name}: the Stage-2 training split is empty; nothing would train the prefix")
    model = TapPer(backbone, users, cfg, backbone_hash)
    examples, held = hold_out(examples, cfg.validation_share, seed)
    encoder = encoder_for(model, task, tokenizer, cache)
    encoded = encoder.encode(examples, model.user_rows, progress=progress)
    items = encoded.items
    model.prefix.fit_input_stats(
        encoded.vectors,
        [it.q_row for it in items],
        [it.hist_rows for it in items],
        [it.dt for it in items],
        [it.dpi for it in items],
    )
    selector = (
        EpochSelector(model, task, tokenizer, encoder.encode(held, model.user_rows, progress=False), 32)
        if held
        else None
    )

    def after_epoch(epoch: int, loss: float) -> None:
        if selector is not None:
            selector(epoch, loss)
        if on_epoch:
            on_epoch(epoch, loss)

    aux = AnswerReadout(model, tuple(task.labels)) if cfg.aux_weight > 0 and task.labels else None
    losses = fit(
        model,
        encoded,
        tokenizer.pad_token_id,
        cfg,
        cfg.epochs,
        seed,
        progress=progress,
        on_epoch=after_epoch,
        aux=aux,
        on_step=on_step,
    )
    best = selector.restore() if selector is not None else None
    model.eval()
    return Stage2Result(
        model=model,
        losses=losses,
        n_examples=len(encoded.items),
        validation=selector.scores if selector else [],
        best_epoch=best,
    )
