"""Row-sparse AdamW for the user table: only the rows a batch visited move.

Each row of E belongs to one user and sees only that user's examples. Dense
AdamW moves every row at every step from its stale momentum and shrinks every
row by weight decay, so a user's row keeps drifting while other users train,
and decay pulls unvisited rows toward zero for no reason. This optimizer keeps
Adam's moments per row and updates, decays and bias-corrects a row only at
the steps its user was in the batch (lazy Adam, as `torch.optim.SparseAdam`
does for sparse gradients, plus decoupled weight decay). A visited row is one
with a non-zero gradient; rows outside the batch get an exactly zero gradient
from the embedding lookup.
"""

from __future__ import annotations

import torch


class RowAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"RowAdamW updates rows of a 2-D table, got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                rows = grad.abs().sum(1).nonzero().squeeze(1)
                if rows.numel() == 0:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    state["row_steps"] = torch.zeros(p.shape[0], dtype=torch.long, device=p.device)
                g = grad[rows]
                m = state["exp_avg"][rows].mul_(beta1).add_(g, alpha=1 - beta1)
                v = state["exp_avg_sq"][rows].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                state["exp_avg"][rows] = m
                state["exp_avg_sq"][rows] = v
                steps = state["row_steps"][rows] + 1
                state["row_steps"][rows] = steps
                c1 = (1 - beta1 ** steps.double()).to(p.dtype).unsqueeze(1)
                c2 = (1 - beta2 ** steps.double()).to(p.dtype).unsqueeze(1)
                w = p[rows]
                if group["weight_decay"]:
                    w = w * (1 - group["lr"] * group["weight_decay"])
                p[rows] = w - group["lr"] * (m / c1) / ((v / c2).sqrt() + group["eps"])
        return None
