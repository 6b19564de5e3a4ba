"""Stage 1: task LoRA on q,k,v,o over the Stage-1 users' query->response pairs, then merge (paper 2.1)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tapper.config import Stage1Config
from tapper.data.types import Example
from tapper.model.backbone import Backbone, save_backbone_dir, weights_hash
from tapper.model.lora import attach_lora, merge_lora
from tapper.model.prefixed_lm import PrefixedLM
from tapper.precision import cast_backbone, needs_loss_scaling, set_checkpointing
from tapper.train.features import FeatureEncoder, lm_train_batch, loss_tokens
from tapper.train.loop import set_seed, train_epochs


@dataclass
class TokenExample:
    id: str
    prompt_ids: list[int]
    target_ids: list[int]


@dataclass
class Stage1Result:
    path: Path  # merged backbone, HF directory
    losses: list[float]
    weights_hash: str
    n_examples: int


def tokenize_examples(task, tokenizer, examples: list[Example], max_len: int) -> list[TokenExample]:
    enc = FeatureEncoder(task, tokenizer, cache=None, max_len=max_len)
    out = []
    for ex in examples:
        if ex.target is None:
            continue
        p, t = enc.tokenize(ex.input, ex.target)
        out.append(TokenExample(ex.id, p, t))
    return out


def train_stage1(
    backbone: Backbone,
    task,
    examples: list[Example],
    cfg: Stage1Config,
    out_dir: str | Path,
    seed: int = 0,
    progress: bool = True,
    on_epoch: Callable[[int, float], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> Stage1Result:
    """Train the task LoRA, merge it, check it is finite, save the merged backbone to `out_dir`."""
    set_seed(seed)
    if cfg.max_examples and len(examples) > cfg.max_examples:
        examples = random.Random(seed).sample(examples, cfg.max_examples)
    items = tokenize_examples(task, backbone.tokenizer, examples, cfg.max_len)
    if not items and not cfg.skip:
        raise ValueError(
            f"{task.name}: the Stage-1 training split is empty (no Stage-1 example with an answer); "
            "lower stage2_users or set stage1.skip=true"
        )
    model = backbone.model
    losses: list[float] = []
    pad = backbone.tokenizer.pad_token_id
    # The merged backbone is saved in this dtype too: Stage 2 and serving read what Stage 1 trained on.
    cast_backbone(model, cfg.dtype)
    set_checkpointing(model, cfg.gradient_checkpointing and not cfg.skip)
    memory = dict(
        micro_batch_size=cfg.micro_batch_size,
        weight_fn=loss_tokens,
        loss_scaling=needs_loss_scaling(cfg.dtype),
        on_step=on_step,
    )
    if not cfg.skip:
        if cfg.mode == "lora":
            trained = attach_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules)
            params = [p for p in trained.parameters() if p.requires_grad]
            desc = "stage 1 (task LoRA)"
        else:
            trained = model
            emb = model.get_input_embeddings().weight
            params = [p for p in model.parameters() if p is not emb]
            emb.requires_grad_(False)
            desc = "stage 1 (full, embeddings frozen)"
        plm = PrefixedLM(trained)
        trained.train()
        losses = train_epochs(
            items,
            lambda b: plm.loss(lm_train_batch(b, pad)),
            [{"params": params, "lr": cfg.lr}],
            cfg.epochs,
            cfg.batch_size,
            seed=seed,
            desc=desc,
            progress=progress,
            on_epoch=on_epoch,
            warmup=cfg.warmup,
            schedule=cfg.schedule,
            **memory,
        )
        if cfg.mode == "lora":
            model = merge_lora(trained)
    set_checkpointing(model, False)
    model.eval()
    path = save_backbone_dir(model, backbone.tokenizer, Path(out_dir))
    return Stage1Result(path=path, losses=losses, weights_hash=weights_hash(path), n_examples=len(items))
