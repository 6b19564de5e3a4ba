"""The one training loop both stages, the baselines and the online updates use."""

from __future__ import annotations

import math
import random
from typing import Callable, Sequence

import torch
from tapper.progress import tqdm  # a bar on a terminal, log lines elsewhere (pipeline steps)

from tapper.train.row_adam import RowAdamW


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(groups: list[dict]) -> list[torch.optim.Optimizer]:
    """AdamW for dense groups; RowAdamW (tapper.train.row_adam) for groups marked `"rows": True` (the user table)."""
    dense = [{k: v for k, v in g.items() if k != "rows"} for g in groups if not g.get("rows")]
    rows = [{k: v for k, v in g.items() if k != "rows"} for g in groups if g.get("rows")]
    opts: list[torch.optim.Optimizer] = []
    if dense:
        opts.append(torch.optim.AdamW(dense, weight_decay=0.0))
    if rows:
        opts.append(RowAdamW(rows))
    return opts


def lr_factor(step: int, total: int, warmup: float, schedule: str) -> float:
    """Linear warm-up over the first `warmup` share of the steps, then constant or linear decay to zero."""
    n_warm = int(warmup * total)
    if step < n_warm:
        return (step + 1) / n_warm
    if schedule == "linear":
        return max(0.0, (total - step) / max(1, total - n_warm))
    return 1.0


def train_epochs(
    items: Sequence,
    loss_fn: Callable[[list], torch.Tensor],
    param_groups: list[dict],
    epochs: float,
    batch_size: int,
    seed: int = 0,
    desc: str = "training",
    progress: bool = True,
    on_epoch: Callable[[int, float], None] | None = None,
    max_grad_norm: float = 1.0,
    warmup: float = 0.0,
    schedule: str = "constant",
    micro_batch_size: int | None = None,
    weight_fn: Callable[[list], int] | None = None,
    loss_scaling: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """AdamW over `param_groups` for `epochs` (fractions allowed) passes; returns mean loss per epoch.

    A group marked `"rows": True` is a user table updated row-sparsely (RowAdamW). The learning rate
    follows `lr_factor` (constant by default). Shuffling uses its own seeded RNG so that runs repeat exactly.

    Micro-batches: each batch is cut into `micro_batch_size` pieces whose gradients add up before the one
    optimizer step. `loss_fn` returns a mean, so a piece's loss is weighted by its share of the batch's loss
    terms, `weight_fn(piece) / weight_fn(batch)` (the number of target tokens for an LM loss; default: the
    number of examples): the summed gradient is then the full batch's. `loss_scaling`: fp16 backbones
    (tapper.precision) scale the loss so small gradients survive fp16, and skip steps whose gradients overflow.
    `on_step(step, loss)` sees every step's loss (one host sync per step, as the progress bar already does).
    """
    groups = [g for g in param_groups if g["params"]]
    if not groups or not items:
        return []
    params = [p for g in groups for p in g["params"]]
    opts = make_optimizer(groups)
    weigh = weight_fn or len
    micro = micro_batch_size or batch_size
    scaler = torch.amp.GradScaler(params[0].device.type) if loss_scaling else None
    rng = random.Random(seed)
    steps_per_epoch = math.ceil(len(items) / batch_size)
    total = max(1, math.ceil(epochs * steps_per_epoch))
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, total, warmup, schedule)) for o in opts]
    losses: list[float] = []
    step = 0
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
    epoch = 0
    while step < total:
        order = list(range(len(items)))
        rng.shuffle(order)
        running, count = 0.0, 0
        for b in range(0, len(order), batch_size):
            if step >= total:
                break
            batch = [items[i] for i in order[b : b + batch_size]]
            for o in opts:
                o.zero_grad(set_to_none=True)
            total_weight = weigh(batch)
            loss = 0.0
            for m in range(0, len(batch), micro):
                piece = batch[m : m + micro]
                part = loss_fn(piece) * (weigh(piece) / total_weight if len(piece) < len(batch) else 1.0)
                (scaler.scale(part) if scaler else part).backward()
                loss = loss + part.detach()
            step_ok = True
            if scaler is not None:
                for o in opts:
                    scaler.unscale_(o)
            norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            if scaler is not None:
                # One decision for every optimizer (GradScaler.step would decide per optimizer): an overflow
                # anywhere skips the whole step and lowers the scale.
                step_ok = bool(torch.isfinite(norm))
                scaler.update()
            for o, sch in zip(opts, scheds):
                if step_ok:
                    o.step()
                sch.step()
            loss_value = float(loss)
            if on_step:
                on_step(step, loss_value)
            running += loss_value
            count += 1
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{running / count:.4f}")
        losses.append(running / max(count, 1))
        if on_epoch:
            on_epoch(epoch, losses[-1])
        epoch += 1
    bar.close()
    return losses
