"""Stage 2: prefix learning (user table, DIN attention, projection, λ's) + bridge LoRA (paper 2.2)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from tapper.config import Stage2Config
from tapper.data.types import Example
from tapper.model.embedding_cache import EmbeddingCache
from tapper.model.tapper import TapPer
from tapper.train.features import EncodedSet, FeatureEncoder
from tapper.train.loop import set_seed, train_epochs


@dataclass
class Stage2Result:
    model: TapPer
    losses: list[float]
    n_examples: int


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


def param_groups(model: TapPer, cfg: Stage2Config, which: tuple[str, ...] = ("user_table", "shared", "lambdas", "bridge")) -> list[dict]:
    groups = model.trainable_parameters()
    rates = {"lambdas": cfg.lambda_lr, "user_table": cfg.user_lr or cfg.lr}
    decay = {"user_table": cfg.user_weight_decay}
    return [{"params": groups[k], "lr": rates.get(k, cfg.lr), "weight_decay": decay.get(k, 0.0)} for k in which]


def fit(model: TapPer, encoded: EncodedSet, pad_id: int, cfg: Stage2Config, epochs: float, seed: int,
        which=("user_table", "shared", "lambdas", "bridge"), progress=True, desc="stage 2 (prefix + bridge)",
        on_epoch: Callable[[int, float], None] | None = None) -> list[float]:
    """Train the named parameter groups of `model` on `encoded` (Stage 2 and online updates share this)."""
    model.train()
    losses = train_epochs(
        encoded.items, lambda b: model.loss(b, encoded.vectors, pad_id), param_groups(model, cfg, which),
        epochs, cfg.batch_size, seed=seed, desc=desc, progress=progress, on_epoch=on_epoch,
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
) -> Stage2Result:
    set_seed(seed)
    model = TapPer(backbone, users, cfg, backbone_hash)
    examples = limit_per_user(examples, cfg.max_examples_per_user)
    encoded = encoder_for(model, task, tokenizer, cache).encode(examples, model.user_rows, progress=progress)
    losses = fit(model, encoded, tokenizer.pad_token_id, cfg, cfg.epochs, seed, progress=progress, on_epoch=on_epoch)
    return Stage2Result(model=model, losses=losses, n_examples=len(encoded.items))
