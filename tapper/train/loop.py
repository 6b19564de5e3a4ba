"""The one training loop both stages, the baselines and the online updates use."""
from __future__ import annotations

import math
import random
from typing import Callable, Sequence

import torch
from tapper.progress import tqdm  # a bar on a terminal, log lines elsewhere (pipeline steps)


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


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
) -> list[float]:
    """AdamW over `param_groups` for `epochs` (fractions allowed) passes; returns mean loss per epoch.

    Shuffling uses its own seeded RNG so that runs repeat exactly.
    """
    groups = [g for g in param_groups if g["params"]]
    if not groups or not items:
        return []
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    rng = random.Random(seed)
    steps_per_epoch = math.ceil(len(items) / batch_size)
    total = max(1, math.ceil(epochs * steps_per_epoch))
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
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
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
