"""Examples -> tensors: token ids for the LM, and cached vectors + time gaps for the prefix.

This is the one place that decides, for an example, which history records the
prefix sees (all of them, or a BM25 top-k), their time gaps (days) and order
gaps, and how prompt and target are tokenized and truncated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tapper.data import bm25
from tapper.data.types import Example
from tapper.model.embedding_cache import EmbeddingCache


@dataclass
class EncodedExample:
    id: str
    user_id: str
    user_row: int
    q_row: int
    hist_rows: list[int]
    dt: list[float]
    dpi: list[float]
    prompt_ids: list[int]
    target_ids: list[int]
    target: str | None
    history_ids: list[str] = field(default_factory=list)


@dataclass
class EncodedSet:
    items: list[EncodedExample]
    vectors: torch.Tensor  # [n_texts, d]; rows referenced by q_row / hist_rows


def time_gaps(ex: Example) -> tuple[list[float], list[float]]:
    """Δt in days from the user's latest history record (0 when a date is missing) and Δπ = order gap
    (1 for the latest record).

    One rule for every example, whatever it carries: LaMP queries have no date, so Δt cannot be measured
    from the query; Stage-2 training examples (made from history records, which do have dates), online
    feedback and served queries are measured the same way, so the newest record is at Δt = 0 at training,
    evaluation and serving alike, and λ_t means the same everywhere.
    """
    dates = [r.date for r in ex.history if r.date is not None]
    latest = max(dates) if dates else None
    n = len(ex.history)
    dt = [0.0 if latest is None or r.date is None else float(max((latest - r.date).days, 0)) for r in ex.history]
    dpi = [float(n - j) for j in range(n)]
    return dt, dpi


def bm25_keep(ex: Example, task, k: int, index: bm25.Bm25Index | None = None) -> list[int]:
    """Indices (chronological) of the k history records BM25 ranks highest for the query.

    The same query and corpus text as RAG (tapper.data.bm25), so the pre-filter keeps what RAG-k would retrieve.
    `index`: the user's BM25 index, shared by all of the user's examples."""
    if len(ex.history) <= k:
        return list(range(len(ex.history)))
    return sorted(bm25.rank(task, ex.input, ex.history, index)[:k])


class FeatureEncoder:
    def __init__(
        self, task, tokenizer, cache: EmbeddingCache, max_len: int, prefix_len: int = 0, bm25_k: int | None = None
    ):
        self.task = task
        self.tok = tokenizer
        self.cache = cache
        self.max_len = max_len
        self.prefix_len = prefix_len
        self.bm25_k = bm25_k

    def tokenize(self, prompt: str, target: str | None) -> tuple[list[int], list[int]]:
        p = self.tok(self.task.prompt(prompt), add_special_tokens=False)["input_ids"]
        t = []
        room = self.max_len - self.prefix_len
        if room < 16:
            raise ValueError(
                f"max_len {self.max_len} leaves {room} tokens after the {self.prefix_len} soft tokens; need >= 16"
            )
        if target is not None:
            t = self.tok(self.task.format_target(target), add_special_tokens=False)["input_ids"] + [
                self.tok.eos_token_id
            ]
            # A target may take at most half of what the soft tokens leave (its head, ending in EOS), so the
            # prompt always keeps the other half.
            if len(t) > room // 2:
                t = t[: room // 2 - 1] + [self.tok.eos_token_id]
        budget = room - len(t)
        if len(p) > budget:
            # Keep the instruction (head) and the "Answer:" cue (tail); cut the middle of the text.
            tail = min(8, budget // 2)
            p = p[: budget - tail] + p[len(p) - tail :]
        return p, t

    def encode(
        self,
        examples: list[Example],
        user_rows: dict[str, int] | None = None,
        progress: bool = True,
        unknown_users: str = "error",
    ) -> EncodedSet:
        """Token ids and vector rows of `examples`. With `user_rows` (a model's user table), a user not in it is an
        error unless `unknown_users="pq_only"` (serving and cold-start evaluation: row 0, P_q only)."""
        if unknown_users not in ("error", "pq_only"):
            raise ValueError(f"unknown_users must be 'error' or 'pq_only', got {unknown_users!r}")
        if user_rows is not None and unknown_users == "error":
            missing = sorted({ex.user_id for ex in examples} - set(user_rows))
            if missing:
                first = next(ex for ex in examples if ex.user_id == missing[0])
                raise KeyError(
                    f"example {first.id!r}: user {missing[0]!r} has no row in the user table "
                    f"({len(missing)} such users); pass unknown_users='pq_only' to serve them with P_q only"
                )
        texts: dict[str, int] = {}

        def row(text: str) -> int:
            return texts.setdefault(text, len(texts))

        items = []
        indexes: dict[str, bm25.Bm25Index] = {}  # one BM25 index per user: their records tokenized once
        for ex in examples:
            if self.bm25_k:
                keep = bm25_keep(ex, self.task, self.bm25_k, indexes.setdefault(ex.user_id, bm25.Bm25Index()))
            else:
                keep = range(len(ex.history))
            dt, dpi = time_gaps(ex)
            prompt_ids, target_ids = self.tokenize(ex.input, ex.target)
            items.append(
                EncodedExample(
                    id=ex.id,
                    user_id=ex.user_id,
                    user_row=(user_rows or {}).get(ex.user_id, 0),
                    # z_q is made from what the query says, not the task's instruction around it.
                    q_row=row(self.task.query_content(ex.input)),
                    hist_rows=[row(self.task.record_text(ex.history[i])) for i in keep],
                    dt=[dt[i] for i in keep],
                    dpi=[dpi[i] for i in keep],
                    prompt_ids=prompt_ids,
                    target_ids=target_ids,
                    target=ex.target,
                    history_ids=[ex.history[i].id for i in keep],
                )
            )
        vectors = self.cache.encode(list(texts), progress=progress)
        return EncodedSet(items=items, vectors=vectors)


def prefix_inputs(items: list[EncodedExample], vectors: torch.Tensor):
    """(user_rows, zq, zh, mask, dt, dpi) with histories right-padded to the batch's longest.

    One gather from `vectors` through a padded index matrix (on `vectors`' device), not a copy per example."""
    B = len(items)
    N = max((len(it.hist_rows) for it in items), default=0)
    index = torch.zeros(B, N, dtype=torch.long)
    mask = torch.zeros(B, N, dtype=torch.bool)
    dt = torch.zeros(B, N)
    dpi = torch.zeros(B, N)
    for i, it in enumerate(items):
        n = len(it.hist_rows)
        if n:
            index[i, :n] = torch.tensor(it.hist_rows)
            mask[i, :n] = True
            dt[i, :n] = torch.tensor(it.dt)
            dpi[i, :n] = torch.tensor(it.dpi)
    device = vectors.device
    index, mask = index.to(device), mask.to(device)
    zh = vectors[index] * mask.unsqueeze(-1).to(vectors.dtype)
    user_rows = torch.tensor([it.user_row for it in items], dtype=torch.long)
    zq = vectors[torch.tensor([it.q_row for it in items], device=device)]
    return user_rows, zq, zh, mask, dt.to(device), dpi.to(device)


def loss_tokens(items) -> int:
    """Target tokens the LM loss of `items` averages over (prompts are never empty, so every target token is
    predicted): the weight of a micro-batch in gradient accumulation (tapper.train.loop)."""
    return sum(len(it.target_ids) for it in items)


def lm_train_batch(items: list[EncodedExample], pad_id: int):
    from tapper.model.prefixed_lm import LMBatch

    T = max(len(it.prompt_ids) + len(it.target_ids) for it in items)
    ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), T), dtype=torch.long)
    labels = torch.full((len(items), T), -100, dtype=torch.long)
    for i, it in enumerate(items):
        seq = it.prompt_ids + it.target_ids
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(it.prompt_ids) : len(seq)] = torch.tensor(it.target_ids)
    return LMBatch(ids, mask, labels)


def lm_generate_batch(items: list[EncodedExample], pad_id: int):
    from tapper.model.prefixed_lm import LMBatch

    T = max(len(it.prompt_ids) for it in items)
    ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), T), dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it.prompt_ids)
        ids[i, T - n :] = torch.tensor(it.prompt_ids)
        mask[i, T - n :] = 1
    return LMBatch(ids, mask)
