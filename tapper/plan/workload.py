"""A synthetic training workload of the real Stage-1 or Stage-2 model on a random-init backbone.

Shared by the plan's CPU check (tapper.plan.measure) and the throughput bench (bench/throughput.py): random token
ids at exactly `seq` tokens (prompt, then half of what the soft tokens leave as target, tapper's most) and, for
Stage 2, `history` records per example with random record vectors. The backbone is built from its config with
random weights, so an 8B-shaped model needs no download; memory and speed do not depend on the weights' values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from tapper.config import RunConfig, Stage1Config, Stage2Config


@dataclass
class Workload:
    stage: int
    items: list
    loss_fn: Callable[[list], torch.Tensor]
    groups: list[dict]
    loop_kwargs: dict
    cfg: RunConfig
    config: object  # the backbone's transformers config
    history: int
    model: torch.nn.Module

    def plan(self):
        from tapper.plan.plan import plan_stage1, plan_stage2

        return (
            plan_stage1(self.config, self.cfg) if self.stage == 1 else plan_stage2(self.config, self.cfg, self.history)
        )


def synthetic_items(n: int, seq: int, prefix_len: int, history: int, vocab: int, users: int = 4) -> list:
    from tapper.train.features import EncodedExample

    room = seq - prefix_len
    n_tgt = max(1, room // 2)
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = torch.randint(4, vocab, (room,), generator=g).tolist()
        out.append(
            EncodedExample(
                id=str(i),
                user_id=f"u{i % users}",
                user_row=1 + i % users,
                q_row=0,
                hist_rows=list(range(1, history + 1)),
                dt=[1.0] * history,
                dpi=[1.0] * history,
                prompt_ids=ids[: room - n_tgt],
                target_ids=ids[room - n_tgt :],
                target=None,
            )
        )
    return out


def build_workload(
    backbone: str,
    stage: int,
    b: int,
    seq: int,
    history: int,
    dtype: str,
    checkpointing: bool,
    micro: int | None,
    device: str | torch.device = "cpu",
    n_items: int | None = None,
    users: int = 4,
) -> Workload:
    """The model, `n_items` (default 2·b) examples, the loss and parameter groups of one stage's training."""
    from transformers import AutoModelForCausalLM

    from tapper.plan.backbones import backbone_config
    from tapper.precision import torch_dtype
    from tapper.train.features import lm_train_batch, loss_tokens

    torch.manual_seed(0)
    config = backbone_config(backbone)
    # Built directly in its dtype on its device: an 8B model never exists in fp32 on the host.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
    pad, vocab = 0, int(config.vocab_size)
    n_items = n_items or 2 * b
    loop = dict(micro_batch_size=micro, weight_fn=loss_tokens, loss_scaling=dtype == "fp16")
    if stage == 1:
        from tapper.model.lora import attach_lora
        from tapper.model.prefixed_lm import PrefixedLM
        from tapper.precision import set_checkpointing

        s1 = Stage1Config(
            batch_size=b,
            max_len=seq,
            dtype=dtype,
            gradient_checkpointing=checkpointing,
            micro_batch_size=micro,
            lora_dropout=0.0,
        )
        cfg = RunConfig(stage1=s1)
        set_checkpointing(model, checkpointing)
        lm = attach_lora(model, s1.lora_r, s1.lora_alpha, 0.0, s1.target_modules)
        plm = PrefixedLM(lm)
        lm.train()
        items = synthetic_items(n_items, seq, 0, 0, vocab, users)
        groups = [{"params": [p for p in lm.parameters() if p.requires_grad], "lr": 1e-4}]
        return Workload(1, items, lambda batch: plm.loss(lm_train_batch(batch, pad)), groups, loop, cfg, config, 0, lm)
    from tapper.model.tapper import TapPer
    from tapper.train.stage2 import param_groups

    s2 = Stage2Config(
        batch_size=b,
        max_len=seq,
        dtype=dtype,
        gradient_checkpointing=checkpointing,
        micro_batch_size=micro,
        bridge_dropout=0.0,
    )
    cfg = RunConfig(stage2=s2, stage2_users=users)
    with torch.device(device):
        tp = TapPer(model, [f"u{i}" for i in range(users)], s2)
        vectors = torch.randn(history + 1, tp.d)
    tp.train()
    items = synthetic_items(n_items, seq, s2.prefix_len, history, vocab, users)
    groups = param_groups(tp, s2)
    return Workload(2, items, lambda batch: tp.loss(batch, vectors, pad), groups, loop, cfg, config, history, tp)
