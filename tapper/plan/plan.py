"""The memory plan of a run config: for Stage 1, Stage 2 and evaluation on one accelerator.

Every figure comes from the modules tapper trains, built on the meta device in the configured dtype (the
backbone from its config, the task LoRA from `attach_lora`, the Stage-2 model from `TapPer` itself):
- weights: every parameter and buffer, in its own dtype (a bf16 backbone, fp32 LoRAs and prefix encoder);
- gradients: the trainable parameters (fp32 master weights, tapper.precision);
- optimizer: AdamW's two moments per trainable number (RowAdamW keeps the same for the user table);
- activations: what autograd saves in one micro-batch's forward (tapper.plan.saved), with and without
  per-block checkpointing; activations are linear in the micro-batch, so two meta forwards (1 and 2
  examples) give the bytes per example, and from them the largest micro-batch that fits;
- workspace: the backward's working set on top of the saved activations: the gradient of the loss's fp32
  logits next to them; with checkpointing, or one recomputed block's activations, whichever is larger.
Sequences are taken at their configured max_len (batches pad to their longest) with half of the tokens
after the soft tokens as targets (the most tapper's truncation lets a target take), and Stage 2's
histories at `history` records: the worst case, not the average.
Evaluation: the weights, the KV cache of a batch at max_len + the new tokens, and the prefill's largest
intermediates (the MLP's, no autograd).

`usable` is the share of the accelerator's memory a plan may fill: the rest is for the CUDA context,
kernels' workspaces and the caching allocator's fragmentation.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tapper.config import RunConfig
from tapper.plan.backbones import backbone_config
from tapper.plan.saved import SavedBytes, count_saved
from tapper.precision import torch_dtype

USABLE = 0.9
ADAM_STATES = 2  # exp_avg and exp_avg_sq, fp32, per trainable number


@dataclass
class StagePlan:
    stage: str
    micro_batch: int
    seq_len: int
    checkpointing: bool
    weights: int
    gradients: int
    optimizer: int
    # Saved activations at `micro_batch`: without and with checkpointing, and what one more example adds to each.
    activations: int
    activations_ckpt: int
    per_example: int
    per_example_ckpt: int
    # The backward's working set (tapper.plan.saved.SavedBytes.workspace), without and with checkpointing.
    workspace: int
    workspace_ckpt: int
    extra: dict = field(default_factory=dict)

    @property
    def fixed(self) -> int:
        return self.weights + self.gradients + self.optimizer

    def peak(self, checkpointing: bool | None = None, micro_batch: int | None = None) -> int:
        ckpt = self.checkpointing if checkpointing is None else checkpointing
        b = self.micro_batch if micro_batch is None else micro_batch
        act, slope, ws = (
            (self.activations_ckpt, self.per_example_ckpt, self.workspace_ckpt)
            if ckpt
            else (self.activations, self.per_example, self.workspace)
        )
        return self.fixed + act + slope * (b - self.micro_batch) + ws * b // self.micro_batch

    def largest_micro_batch(self, budget: int, checkpointing: bool | None = None, cap: int = 4096) -> int:
        """The most examples per micro-batch whose peak stays within `budget` bytes (0: not even one)."""
        lo, hi = 0, cap
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.peak(checkpointing, mid) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def to_dict(self, budget: int | None = None) -> dict:
        d = dataclasses.asdict(self)
        d["peak"] = self.peak()
        d["peak_without_checkpointing"] = self.peak(False)
        d["peak_with_checkpointing"] = self.peak(True)
        if budget is not None:
            d["fits"] = self.peak() <= budget
            d["largest_micro_batch"] = self.largest_micro_batch(budget)
            d["largest_micro_batch_without_checkpointing"] = self.largest_micro_batch(budget, False)
            d["largest_micro_batch_with_checkpointing"] = self.largest_micro_batch(budget, True)
        return d


def _bytes(tensors) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


def _meta_backbone(config, dtype: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model.to(torch_dtype(dtype))


def _loss_on_targets(plm, embeds: torch.Tensor, n_targets: int) -> torch.Tensor:
    """PrefixedLM.loss on meta: the decoder, then the head on the last `n_targets` positions only (the real loss
    selects target positions with a boolean mask, a data-dependent shape meta tensors cannot have)."""
    b, T, d = embeds.shape
    hidden = plm.decoder(inputs_embeds=embeds, use_cache=False).last_hidden_state
    h = hidden[:, T - n_targets - 1 : T - 1].reshape(-1, d)
    logits = plm.lm_head(h)
    labels = torch.zeros(h.shape[0], dtype=torch.long, device=h.device)
    return F.cross_entropy(logits.float(), labels)


def _targets(seq_len: int, prefix_len: int) -> int:
    return max(1, (seq_len - prefix_len) // 2)


def _finish(stage, micro, seq_len, ckpt, model, trainable, measure, mask_bytes, extra=None) -> StagePlan:
    # Every saved tensor has the batch as a dimension (the rotary tables, a few KiB, aside), so the bytes at
    # `micro` examples are those at 1 plus (micro - 1) times the difference between 2 and 1.
    one, two = measure(1), measure(2)
    act = lambda s, c, b: s.total(c) + mask_bytes * b  # noqa: E731
    slope, slope_ckpt = act(two, False, 2) - act(one, False, 1), act(two, True, 2) - act(one, True, 1)
    return StagePlan(
        stage=stage,
        micro_batch=micro,
        seq_len=seq_len,
        checkpointing=ckpt,
        weights=_bytes(model.parameters()) + _bytes(model.buffers()),
        gradients=_bytes(trainable),
        optimizer=ADAM_STATES * sum(p.numel() * 4 for p in trainable),
        activations=act(one, False, 1) + slope * (micro - 1),
        activations_ckpt=act(one, True, 1) + slope_ckpt * (micro - 1),
        per_example=slope,
        per_example_ckpt=slope_ckpt,
        workspace=one.workspace(False) * micro,
        workspace_ckpt=one.workspace(True) * micro,
        extra=extra or {},
    )


def plan_stage1(config, cfg: RunConfig) -> StagePlan:
    from tapper.model.lora import attach_lora
    from tapper.model.prefixed_lm import PrefixedLM

    s1 = cfg.stage1
    model = _meta_backbone(config, s1.dtype)
    if s1.mode == "lora":
        with torch.device("meta"):
            model = attach_lora(model, s1.lora_r, s1.lora_alpha, s1.lora_dropout, s1.target_modules)
    else:
        emb = model.get_input_embeddings().weight
        for p in model.parameters():
            p.requires_grad_(p is not emb)
    plm = PrefixedLM(model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    T, n_tgt = s1.max_len, _targets(s1.max_len, 0)

    def measure(b: int) -> SavedBytes:
        ids = torch.zeros(b, T, dtype=torch.long, device="meta")
        return count_saved(model, plm.decoder.layers, lambda: _loss_on_targets(plm, plm.embed(ids), n_tgt))

    micro = s1.micro_batch_size or s1.batch_size
    return _finish(
        "stage1",
        micro,
        T,
        s1.gradient_checkpointing,
        model,
        trainable,
        measure,
        T * T,
        {"dtype": s1.dtype, "target_tokens": n_tgt, "batch_size": s1.batch_size},
    )


def _meta_tapper(config, cfg: RunConfig):
    from tapper.model.tapper import TapPer

    # History dropout draws a data-dependent branch; it changes no tensor's size. Checkpointing is left off: the
    # blocks' saved tensors must reach count_saved's hooks (the checkpointed figure is derived from them).
    s2 = dataclasses.replace(cfg.stage2, history_dropout=0.0, gradient_checkpointing=False)
    backbone = _meta_backbone(config, s2.dtype)
    with torch.device("meta"):
        return TapPer(backbone, [f"u{i}" for i in range(cfg.stage2_users)], s2)


def plan_stage2(config, cfg: RunConfig, history: int, model=None) -> StagePlan:
    s2 = cfg.stage2
    model = model if model is not None else _meta_tapper(config, cfg)
    model.train()
    plm, prefix = model.plm, model.prefix
    trainable = [p for ps in model.trainable_parameters().values() for p in ps]
    T, L, d, N = s2.max_len, s2.prefix_len, model.d, history
    n_tgt = _targets(T, L)

    def step(b: int):
        meta = dict(device="meta")
        zq = torch.zeros(b, d, **meta)
        zh = torch.zeros(b, N, d, **meta)
        mask = torch.zeros(b, N, dtype=torch.bool, **meta)
        dt, dpi = torch.zeros(b, N, **meta), torch.zeros(b, N, **meta)
        P, _ = prefix(torch.zeros(b, dtype=torch.long, **meta), zq, zh, mask, dt, dpi)
        ids = torch.zeros(b, T - L, dtype=torch.long, **meta)
        embeds = torch.cat([P.to(plm.embed.weight.dtype), plm.embed(ids)], dim=1)
        if plm.scope is not None:
            plm.scope.positions = torch.arange(T, **meta) < L
        return _loss_on_targets(plm, embeds, n_tgt)

    def measure(b: int) -> SavedBytes:
        saved = count_saved(model, plm.decoder.layers, lambda: step(b))
        # The batch's history vectors are on the device through the forward (prefix_inputs), saved or not.
        saved.outside += b * N * d * 4 + b * d * 4
        return saved

    micro = s2.micro_batch_size or s2.batch_size
    return _finish(
        "stage2",
        micro,
        T,
        s2.gradient_checkpointing,
        model,
        trainable,
        measure,
        T * T,
        {
            "dtype": s2.dtype,
            "target_tokens": n_tgt,
            "history": N,
            "users": cfg.stage2_users,
            "batch_size": s2.batch_size,
        },
    )


def plan_eval(config, cfg: RunConfig, max_new_tokens: int = 32, model=None) -> StagePlan:
    """Generation with the Stage-2 model (the largest thing evaluated): weights, KV cache, prefill intermediates."""
    model = model if model is not None else _meta_tapper(config, cfg)
    s2, b = cfg.stage2, cfg.eval.batch_size
    T = s2.max_len + (cfg.eval.max_new_tokens or max_new_tokens)
    size = torch.tensor([], dtype=torch_dtype(s2.dtype)).element_size()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    kv = 2 * config.num_hidden_layers * T * kv_heads * head_dim * size
    # Prefill: the MLP's gate, up and their product ([T, ffn] each) next to the residual stream, per example.
    prefill = T * (3 * config.intermediate_size + 4 * config.hidden_size) * size + config.vocab_size * 4
    per_example = kv + prefill
    return StagePlan(
        stage="eval",
        micro_batch=b,
        seq_len=T,
        checkpointing=False,
        weights=_bytes(model.parameters()) + _bytes(model.buffers()),
        gradients=0,
        optimizer=0,
        activations=per_example * b,
        activations_ckpt=per_example * b,
        per_example=per_example,
        per_example_ckpt=per_example,
        workspace=0,
        workspace_ckpt=0,
        extra={"dtype": s2.dtype, "kv_cache_per_example": kv, "batch_size": b},
    )


def plan_run(backbone: str, cfg: RunConfig, gpu_mem: int, history: int = 512) -> dict:
    """The plan of every stage of `cfg` on `backbone` for an accelerator of `gpu_mem` bytes."""
    config = backbone_config(backbone)
    budget = int(gpu_mem * USABLE)
    stages = [plan_stage1(config, cfg)] if not cfg.stage1.skip else []
    tapper = _meta_tapper(config, cfg)
    stages += [plan_stage2(config, cfg, history, tapper), plan_eval(config, cfg, model=tapper)]
    return {
        "backbone": backbone,
        "gpu_mem": gpu_mem,
        "usable": USABLE,
        "budget": budget,
        "history": history,
        "stages": {s.stage: s.to_dict(budget) for s in stages},
        "fits": all(s.peak() <= budget for s in stages),
    }


def parse_bytes(text: str) -> int:
    """'80GB' (10^9), '80GiB' (2^30), '512MB', or a plain number of bytes."""
    t = text.strip().upper().replace(" ", "")
    units = {
        "TIB": 2**40,
        "GIB": 2**30,
        "MIB": 2**20,
        "KIB": 2**10,
        "TB": 10**12,
        "GB": 10**9,
        "MB": 10**6,
        "KB": 10**3,
        "B": 1,
    }
    for u, mult in units.items():
        if t.endswith(u):
            return int(float(t[: -len(u)]) * mult)
    return int(math.floor(float(t)))
