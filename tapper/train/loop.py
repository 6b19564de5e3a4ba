"""The one training loop both stages, the baselines and the online updates use."""
from __future__ import annotations

import math
import random
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

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
) -> list[float]:
    """AdamW over `param_groups` for `epochs` (fractions allowed) passes; returns mean loss per epoch.

    A group marked `"rows": True` is a user table updated row-sparsely (RowAdamW). The learning rate
    follows `lr_factor` (constant by default). Shuffling uses its own seeded RNG so that runs repeat exactly.
    """
    groups = [g for g in param_groups if g["params"]]
    if not groups or not items:
        return []
    params = [p for g in groups for p in g["params"]]
    opts = make_optimizer(groups)
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
            loss = loss_fn(batch)
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            for o, sch in zip(opts, scheds):
                o.step()
                sch.step()
            running += float(loss.detach())
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
