"""Examples -> tensors: token ids for the LM, and cached vectors + time gaps for the prefix.

This is the one place that decides, for an example, which history records the
prefix sees (all of them, or a BM25 top-k), their time gaps (days) and order
gaps, and how prompt and target are tokenized and truncated.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from rank_bm25 import BM25Okapi

from tapper.data.types import Example
from tapper.model.embedding_cache import EmbeddingCache

_WORD = re.compile(r"\w+")


def bm25_tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


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
    """Δt in days (0 when a date is missing) and Δπ = order gap (1 for the latest record)."""
    dates = [r.date for r in ex.history if r.date is not None]
    qdate = ex.query_date or (max(dates) if dates else None)
    n = len(ex.history)
    dt = []
    for r in ex.history:
        if qdate is None or r.date is None:
            dt.append(0.0)
        else:
            dt.append(float(max((qdate - r.date).days, 0)))
    dpi = [float(n - j) for j in range(n)]
    return dt, dpi


def bm25_keep(ex: Example, task, k: int) -> list[int]:
    """Indices (chronological) of the k history records BM25 ranks highest for the query."""
    if len(ex.history) <= k:
        return list(range(len(ex.history)))
    corpus = [bm25_tokens(task.record_text(r)) or ["<empty>"] for r in ex.history]
    scores = BM25Okapi(corpus).get_scores(bm25_tokens(ex.input))
    top = sorted(range(len(scores)), key=lambda i: (-scores[i], -i))[:k]
    return sorted(top)


class FeatureEncoder:
    def __init__(self, task, tokenizer, cache: EmbeddingCache, max_len: int, prefix_len: int = 0, bm25_k: int | None = None):
        self.task = task
        self.tok = tokenizer
        self.cache = cache
        self.max_len = max_len
        self.prefix_len = prefix_len
        self.bm25_k = bm25_k

    def tokenize(self, prompt: str, target: str | None) -> tuple[list[int], list[int]]:
        p = self.tok(self.task.prompt(prompt), add_special_tokens=False)["input_ids"]
        t = []
        if target is not None:
            t = self.tok(self.task.format_target(target), add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        budget = self.max_len - self.prefix_len - len(t)
        if len(p) > budget:
            # Keep the instruction (head) and the "Answer:" cue (tail); cut the middle of the text.
            tail = min(8, budget // 2)
            p = p[: budget - tail] + p[len(p) - tail :]
        return p, t

    def encode(self, examples: list[Example], user_rows: dict[str, int] | None = None, progress: bool = True) -> EncodedSet:
        texts: dict[str, int] = {}

        def row(text: str) -> int:
            return texts.setdefault(text, len(texts))

        items = []
        for ex in examples:
            keep = bm25_keep(ex, self.task, self.bm25_k) if self.bm25_k else range(len(ex.history))
            dt, dpi = time_gaps(ex)
            prompt_ids, target_ids = self.tokenize(ex.input, ex.target)
            items.append(
                EncodedExample(
                    id=ex.id,
                    user_id=ex.user_id,
                    user_row=(user_rows or {}).get(ex.user_id, 0),
                    q_row=row(ex.input),
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
    """(user_rows, zq, zh, mask, dt, dpi) with histories right-padded to the batch's longest."""
    B = len(items)
    N = max((len(it.hist_rows) for it in items), default=0)
    d = vectors.shape[1]
    zh = torch.zeros(B, N, d)
    mask = torch.zeros(B, N, dtype=torch.bool)
    dt = torch.zeros(B, N)
    dpi = torch.zeros(B, N)
    for i, it in enumerate(items):
        n = len(it.hist_rows)
        if n:
            zh[i, :n] = vectors[torch.tensor(it.hist_rows)]
            mask[i, :n] = True
            dt[i, :n] = torch.tensor(it.dt)
            dpi[i, :n] = torch.tensor(it.dpi)
    user_rows = torch.tensor([it.user_row for it in items], dtype=torch.long)
    zq = vectors[torch.tensor([it.q_row for it in items])]
    return user_rows, zq, zh, mask, dt, dpi


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
