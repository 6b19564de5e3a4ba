"""OPPU (One PEFT Per User, Tan et al. 2024): a LoRA per user on top of the Stage-1 merged backbone.

Each user gets a LoRA (r=8 on q_proj, k_proj, v_proj, o_proj: the paper's
Appendix A.4 gives OPPU "the same target modules as our method"; OPPU's own
code used q_proj, v_proj, kept as `OppuConfig.target_modules`) trained only on that user's Stage-2
training examples (one per history
record, each seeing the records before it). Every user starts from the same
initial adapter, so two users' adapters differ only through their data.
Variants: `oppu` (plain prompt), `oppu-rag` (+ BM25 top-1 record in the
prompt, in training and evaluation alike), `oppu-pag` (+ the PAG profile
too: OPPU's +pag column is cumulative over +rag).

Training budget is TAP-PER's Stage 2 (epochs, lr, batch size, max_len,
max_examples_per_user), so `--set stage2.lr=...` moves both alike.

Stored: `<out>/oppu/<variant>/users/<n>.safetensors` (PEFT adapter tensors,
one file per user) and `index.json` (user id -> file, example count, params).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tapper.progress import tqdm  # a bar on a terminal, log lines elsewhere (pipeline steps)
from peft import get_peft_model_state_dict
from safetensors.torch import save_file

from tapper.atomic import atomic_write, atomic_write_json
from tapper.methods.prompted import PromptSpec, baseline_max_len, encode_augmented, make_profiles
from tapper.data.types import Example
from tapper.eval.predict import generate_texts
from tapper.methods.registry import Method
from tapper.model.lora import attach_lora
from tapper.model.prefixed_lm import PrefixedLM
from tapper.train.features import EncodedSet, lm_train_batch
from tapper.train.loop import set_seed, train_epochs
from tapper.train.stage2 import limit_per_user


@dataclass
class OppuConfig:
    r: int = 8
    alpha: int = 8
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    epochs: float = 3
    lr: float = 1e-4
    batch_size: int = 16
    max_len: int = 256
    max_examples_per_user: int | None = None

    @classmethod
    def from_run(cls, cfg) -> "OppuConfig":
        s2 = cfg.stage2
        return cls(
            epochs=s2.epochs,
            lr=s2.lr,
            batch_size=s2.batch_size,
            max_len=baseline_max_len(cfg),
            max_examples_per_user=s2.max_examples_per_user,
            target_modules=list(cfg.oppu_targets),
        )


@dataclass
class UserAdapter:
    user_id: str
    n_examples: int
    losses: list[float]
    seen_ids: set[str]  # ids of the examples the trainer actually received in batches
    path: Path | None = None


@dataclass
class OppuRun:
    predictions: dict[str, str]
    users: dict[str, UserAdapter]
    per_user_params: int
    prompts: dict[str, list[str]]  # example id -> retrieved record ids (oppu-rag / oppu-pag)


def lora_parameters(peft_model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in peft_model.named_parameters() if "lora_" in n}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:80]


def train_user_adapters(
    backbone: torch.nn.Module,
    tokenizer,
    task,
    train: list[Example],
    evals: list[Example],
    spec: PromptSpec,
    ocfg: OppuConfig,
    seed: int = 0,
    store: Path | None = None,
    profiles: dict[str, str] | None = None,
    eval_batch_size: int = 16,
    max_new_tokens: int | None = None,
    progress: bool = True,
    on_user: Callable[[str, UserAdapter], None] | None = None,
) -> OppuRun:
    """Train one adapter per user (users of `evals`), evaluate each user with their own adapter."""
    set_seed(seed)  # the shared initial adapter depends on the seed only
    peft_model = attach_lora(backbone, ocfg.r, ocfg.alpha, ocfg.dropout, ocfg.target_modules)
    plm = PrefixedLM(peft_model)
    params = lora_parameters(peft_model)
    init = {n: p.detach().clone() for n, p in params.items()}
    per_user = sum(p.numel() for p in params.values())
    pad = tokenizer.pad_token_id

    train = limit_per_user(train, ocfg.max_examples_per_user)
    tr_set, _ = encode_augmented(task, tokenizer, train, spec.k, ocfg.max_len, profiles)
    ev_set, ev_aug = encode_augmented(task, tokenizer, evals, spec.k, ocfg.max_len, profiles)
    users = list(dict.fromkeys(it.user_id for it in ev_set.items))
    train_by_user: dict[str, list] = {}
    for it in tr_set.items:
        train_by_user.setdefault(it.user_id, []).append(it)

    preds: dict[str, str] = {}
    adapters: dict[str, UserAdapter] = {}
    for n, user in enumerate(tqdm(users, desc="oppu: one adapter per user", disable=not progress, leave=False)):
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(init[name])
        items = train_by_user.get(user, [])
        seen: set[str] = set()

        def loss_fn(batch, _seen=seen):
            _seen.update(it.id for it in batch)
            return plm.loss(lm_train_batch(batch, pad))

        set_seed(seed)
        peft_model.train()
        losses = train_epochs(
            items,
            loss_fn,
            [{"params": list(params.values()), "lr": ocfg.lr}],
            ocfg.epochs,
            ocfg.batch_size,
            seed=seed,
            desc=f"oppu user {n + 1}/{len(users)}",
            progress=False,
        )
        peft_model.eval()
        adapter = UserAdapter(user, len(items), losses, seen)
        if store is not None:
            path = Path(store) / "users" / f"{n:05d}-{_safe(user)}.safetensors"
            state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
            atomic_write(path, lambda tmp, s=state: save_file(s, tmp))
            adapter.path = path
        user_items = [it for it in ev_set.items if it.user_id == user]
        preds.update(
            generate_texts(
                plm, EncodedSet(user_items, ev_set.vectors), tokenizer, task, eval_batch_size, max_new_tokens, False
            )
        )
        adapters[user] = adapter
        if on_user:
            on_user(user, adapter)
    if store is not None:
        atomic_write_json(
            Path(store) / "index.json",
            {
                "per_user_params": per_user,
                "lora": {"r": ocfg.r, "alpha": ocfg.alpha, "targets": ocfg.target_modules},
                "users": {
                    u: {"file": a.path.name if a.path else None, "n_examples": a.n_examples}
                    for u, a in adapters.items()
                },
            },
        )
    return OppuRun(preds, adapters, per_user, {i: [r.id for r in a.records] for i, a in ev_aug.items()})


def run_oppu(variant: str, spec: PromptSpec, stage1_dir, data, cfg, out_dir, progress=True, log=None):
    from tapper.methods.result import VariantResult, score
    from tapper.model.backbone import load_backbone_dir

    t0 = time.time()
    bb = load_backbone_dir(stage1_dir)
    task = data.task
    profiles = None
    if spec.profile:
        # Profiles come from the merged backbone before any adapter is attached (same text as PAG's), each from
        # its example's own history: a training example never sees the record it predicts.
        train = limit_per_user(data.splits.stage2_train, cfg.stage2.max_examples_per_user)
        profiles, _ = make_profiles(
            bb.model, bb.tokenizer, task, train + data.splits.eval, progress, model_hash=bb.weights_hash
        )
    ocfg = OppuConfig.from_run(cfg)
    done = []

    def on_user(user, adapter):
        done.append(user)
        if log and adapter.losses:
            log(f"{variant}/{user}", len(adapter.losses) - 1, adapter.losses[-1])

    run = train_user_adapters(
        bb.model,
        bb.tokenizer,
        task,
        data.splits.stage2_train,
        data.splits.eval,
        spec,
        ocfg,
        seed=cfg.seed,
        store=Path(out_dir) / "oppu" / variant,
        profiles=profiles,
        eval_batch_size=cfg.eval.batch_size,
        max_new_tokens=cfg.eval.max_new_tokens,
        progress=progress,
        on_user=on_user,
    )
    mean_loss = [
        sum(a.losses[-1] for a in run.users.values() if a.losses)
        / max(sum(1 for a in run.users.values() if a.losses), 1)
    ]
    return VariantResult(
        variant,
        run.predictions,
        score(data, run.predictions),
        per_user_params=run.per_user_params,
        shared_params=0,
        losses=mean_loss,
        seconds=time.time() - t0,
        extra={
            "users": len(run.users),
            "n_train": sum(a.n_examples for a in run.users.values()),
            "k": spec.k,
            "lora_r": ocfg.r,
            "lora_targets": ocfg.target_modules,
        },
    )


# OPPU (Tan et al., 2024) and its retrieval/profile-augmented forms: one LoRA per user.
SPECS = {
    "oppu": PromptSpec(k=0, profile=False),
    "oppu-rag": PromptSpec(k=1, profile=False),
    "oppu-pag": PromptSpec(k=1, profile=True),
}


def run(variant, stage1_dir, data, cfg, out_dir, progress=True, log=None):
    return run_oppu(variant, SPECS[variant], stage1_dir, data, cfg, out_dir, progress, log)


METHODS = (
    Method("oppu", "oppu", "one LoRA (r=8, q,k,v,o) per user, trained on that user's history", run),
    Method("oppu-rag", "oppu", "oppu + BM25 top-1 in the prompt (training and evaluation)", run),
    Method("oppu-pag", "oppu", "oppu-rag + the PAG profile", run),
)
