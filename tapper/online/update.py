"""Absorb new feedback into a trained TAP-PER model: the one update both the online
simulation and the serving stack call.

    report = update_users(model, task, tokenizer, cache, new_examples, mode="emb")

Modes (paper 4.6):
    emb    Online-Emb: only the affected users' rows of the user table E change.
    full   Online-Full: those rows + the shared P_q network (DIN scorer, projection,
           λ_t, λ_o) + the bridge LoRA. The merged backbone never changes.

Guarantees, whatever the mode:
    - rows of E that belong to users without a new example stay bit-identical, and row 0,
      the unknown-user row, is never touched: during the update the table is replaced by
      a parameter holding only the affected rows, which are written back afterwards. So
      the optimizer never sees the other rows (weight decay or momentum cannot move them),
      and an update costs the same with a thousand users as with millions (no dense
      gradient or Adam state the size of the whole table);
    - in `emb` mode no other tensor changes: every other parameter is frozen for the
      duration of the update (requires_grad restored afterwards);
    - a user not yet in the table gets a new row, initialised to zero, i.e. exactly the
      unknown-user prefix (P_q only) until the update moves it; the table keeps spare zero
      rows, so a new user does not copy the whole table (see `add_users`); a paged table
      (tapper.model.paged_table) stays paged when it grows.

Training reuses `tapper.train.stage2.fit` (the Stage-2 loop, AdamW, clipping), with the
budget given as epochs over the new examples or as an exact number of optimizer steps.
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

from tapper.data.splits import record_examples
from tapper.data.types import Example, Record
from tapper.model.embedding_cache import EmbeddingCache
from tapper.model.paged_table import fill_in_chunks, paged_tensor
from tapper.model.tapper import TapPer
from tapper.train.loop import set_seed
from tapper.train.stage2 import encoder_for, fit

MODES = {"emb": ("user_table",), "full": ("user_table", "shared", "lambdas", "bridge")}


@dataclass
class UpdateReport:
    mode: str
    users: list[str]  # users whose rows were updated (sorted)
    new_users: list[str]  # of those, users that got a new row of the table
    n_examples: int
    steps: int  # optimizer steps taken
    params_touched: int  # scalars the update was allowed to change
    seconds: float
    losses: list[float] = field(default_factory=list)  # mean loss per pass

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Spare rows added when the table is full: a quarter of its size, at least this many. A new
# user then costs one row write, and the table is copied only once per ~25 % growth (amortised
# O(1) per user instead of a copy of the whole table for every new user).
GROWTH_FRACTION = 0.25
MIN_GROWTH_ROWS = 64


def add_users(model: TapPer, user_ids: Sequence[str]) -> list[str]:
    """Give every user not yet in the table a row (zero = the unknown-user prefix).

    Existing rows, row 0 included, keep their values and their indices. The new users take
    spare rows if the table has them (they are zero: never trained, never saved); only a
    full table is reallocated, with room to spare. Without P_u (use_pu=false) nothing is
    stored per user, so only the id is recorded. Returns the new ids.
    """
    new = [u for u in dict.fromkeys(user_ids) if u not in model.user_rows]
    if not new:
        return []
    needed = model.rows_in_use + len(new) if model.cfg.use_pu else 1
    old = model.prefix.user_table
    if needed > old.num_embeddings:
        capacity = max(needed, old.num_embeddings + max(MIN_GROWTH_ROWS, int(old.num_embeddings * GROWTH_FRACTION)))
        table_dir = getattr(model, "table_dir", None)
        if table_dir is not None:
            # A paged table stays paged: the grown one is a new scratch file in the same directory (zero-filled
            # already, so only the copied rows are written); the old file goes with the old tensor.
            grown = nn.Embedding(
                capacity,
                old.embedding_dim,
                _weight=paged_tensor(table_dir, capacity, old.embedding_dim, old.weight.dtype),
            )
            fill_in_chunks(grown.weight, old.weight, old.num_embeddings)
        else:
            grown = nn.Embedding(capacity, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
            with torch.no_grad():
                grown.weight.zero_()
                grown.weight[: old.num_embeddings].copy_(old.weight)
        grown.weight.requires_grad_(old.weight.requires_grad)
        model.prefix.user_table = grown
    for u in new:
        model.user_ids.append(u)
        model.user_rows[u] = len(model.user_ids)  # row 0 is the unknown user, known users start at 1
    return new


def feedback_examples(task, user_id: str, history: Sequence[Record], new_records: Sequence[Record]) -> list[Example]:
    """Training examples for a user's new records: each sees every record before it.

    `history` is what the user had before; `new_records` arrive after it, in order. This is
    what the serving stack calls on feedback before `update_users`.
    """
    seen = list(history) + list(new_records)
    ids = {r.id for r in new_records}
    return [ex for ex in record_examples(user_id, seen, task) if ex.source_record_id in ids]


def steps_for(n_examples: int, batch_size: int, epochs: float) -> int:
    """Optimizer steps `fit` takes for `epochs` passes (the formula of tapper.train.loop)."""
    if n_examples == 0:
        return 0
    return max(1, math.ceil(epochs * math.ceil(n_examples / batch_size)))


def update_users(
    model: TapPer,
    task,
    tokenizer,
    cache: EmbeddingCache,
    new_examples: list[Example],
    mode: str = "emb",
    *,
    epochs: float = 1.0,
    steps: int | None = None,
    lr: float | None = None,
    lambda_lr: float | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> UpdateReport:
    """Update `model` in place on `new_examples` (their users' rows; in `full` mode also the
    shared P_q network and bridge). Budget: `steps` optimizer steps if given, else `epochs`
    passes. lr / lambda_lr / batch_size default to the model's Stage-2 values."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    if not model.cfg.use_pu and mode == "emb":
        raise ValueError("Online-Emb updates user-table rows, but this model has no P_u (use_pu=false)")
    t0 = time.perf_counter()
    users = sorted({ex.user_id for ex in new_examples})
    new_users = add_users(model, users)
    bs = batch_size or model.cfg.batch_size
    # The model's micro-batch (a memory bound) still applies to an update's own batch size, capped by it.
    micro = min(model.cfg.micro_batch_size, bs) if model.cfg.micro_batch_size else None
    cfg = dataclasses.replace(
        model.cfg,
        lr=lr or model.cfg.lr,
        lambda_lr=lambda_lr or model.cfg.lambda_lr,
        batch_size=bs,
        micro_batch_size=micro,
    )
    if not new_examples:
        return UpdateReport(mode, users, new_users, 0, 0, 0, time.perf_counter() - t0)
    encoded = encoder_for(model, task, tokenizer, cache).encode(new_examples, model.user_rows, progress=progress)
    n = len(encoded.items)
    per_epoch = math.ceil(n / cfg.batch_size)
    # `fit` takes ceil(epochs * steps_per_epoch) steps; half a step below `steps` rounds to it exactly.
    epochs = (steps - 0.5) / per_epoch if steps else epochs
    n_steps = steps_for(n, cfg.batch_size, epochs)

    which = MODES[mode]
    rows = sorted(model.user_rows[u] for u in users) if model.cfg.use_pu else []
    with _rows_only(model, rows):
        groups = model.trainable_parameters()
        touched = sum(p.numel() for k in which for p in groups[k])
        with _only_trainable([p for k in which for p in groups[k]], model):
            set_seed(seed)
            losses = fit(
                model,
                encoded,
                tokenizer.pad_token_id,
                cfg,
                epochs,
                seed,
                which=which,
                progress=progress,
                desc=f"online-{mode} update",
            )
    return UpdateReport(mode, users, new_users, n, n_steps, touched, time.perf_counter() - t0, losses)


@contextmanager
def _only_trainable(params: list[nn.Parameter], model: nn.Module) -> Iterator[None]:
    """Freeze every parameter of `model` except `params` for the duration of the block."""
    keep = {id(p) for p in params}
    before = {id(p): p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p in model.parameters():
            p.requires_grad_(before[id(p)])


class _RowSubset(nn.Module):
    """Stands in for the user table during an update: the affected rows only, as their own parameter.

    Looks up global row indices (what the encoded examples carry); an index outside `rows` is an error,
    since every example of an update belongs to one of its users."""

    def __init__(self, table: nn.Embedding, rows: list[int]):
        super().__init__()
        self.register_buffer("rows", torch.tensor(rows, dtype=torch.long, device=table.weight.device))
        self.weight = nn.Parameter(table.weight.detach()[rows].clone(), requires_grad=table.weight.requires_grad)
        self.num_embeddings, self.embedding_dim = table.num_embeddings, table.embedding_dim

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        local = torch.searchsorted(self.rows, index).clamp(max=len(self.rows) - 1)
        if not torch.equal(self.rows[local], index):
            raise ValueError("an example's user row is not among the rows this update may change")
        return nn.functional.embedding(local, self.weight)


@contextmanager
def _rows_only(model: TapPer, rows: list[int]) -> Iterator[None]:
    """Let only `rows` of the user table change; they are written back when the block completes."""
    if not model.cfg.use_pu:
        yield
        return
    table = model.prefix.user_table
    subset = _RowSubset(table, rows)
    model.prefix.user_table = subset
    try:
        yield
    finally:
        model.prefix.user_table = table
    # Only after a completed update: a failed one leaves the table as it was.
    with torch.no_grad():
        table.weight[rows] = subset.weight.detach()
