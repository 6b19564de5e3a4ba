"""Where a user's signal is lost between the history and the answer (issue 17's diagnostics).

TAP-PER's inputs are the same cached record vectors a linear readout gets, yet it can learn less than
that readout. These measurements say at which stage the difference arises, from a finished
`tapper experiment` directory (its Stage-1 backbone and saved TAP-PER states), on the same split:

- inputs: how alike two queries' z_q are (the templated input vs the query's content), and how alike two
  users' pooled histories are (raw, and after removing the mean over users), i.e. how much of what P_q
  receives is user-specific at all;
- components: each trained variant's accuracy on its own training examples against the held-out queries
  (memorizing vs under-fitting), how concentrated the DIN's attention α is (normalized entropy, largest
  weight), how often a user's queries all attend most to the same record (attention that ignores the
  query), and the sizes of the two prefix parts (P_q's projection vs the user's row P_u) the LM receives.

The measurements are descriptive; bench/core_diagnostics.py writes them as JSON beside the run.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict

import torch

from tapper.data.types import Example


def mean_pairwise_cosine(vectors: torch.Tensor) -> float:
    """Mean cosine over distinct pairs of rows."""
    n = vectors.shape[0]
    if n < 2:
        return float("nan")
    unit = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sims = unit @ unit.T
    return float((sims.sum() - sims.diagonal().sum()) / (n * n - n))


def _unit_rms(v: torch.Tensor) -> torch.Tensor:
    return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True).clamp_min(1e-12))


@torch.no_grad()
def input_report(task, cache, queries: list[Example], max_users: int = 60, seed: int = 0) -> dict:
    """z_q and pooled-history similarity over the evaluation queries (one query per user for the histories)."""
    rng = random.Random(seed)
    by_user: dict[str, Example] = {}
    for ex in queries:
        by_user.setdefault(ex.user_id, ex)
    users = sorted(by_user)
    rng.shuffle(users)
    firsts = [by_user[u] for u in users[:max_users] if by_user[u].history]
    templated = cache.encode([ex.input for ex in queries], progress=False)
    content = cache.encode([task.query_content(ex.input) for ex in queries], progress=False)
    pooled = torch.stack(
        [_unit_rms(cache.encode([task.record_text(r) for r in ex.history], progress=False)).mean(0) for ex in firsts]
    )
    centered = pooled - pooled.mean(0)
    return {
        "queries": len(queries),
        "zq_cosine_templated": round(mean_pairwise_cosine(templated), 4),
        "zq_cosine_query_content": round(mean_pairwise_cosine(content), 4),
        "users": len(firsts),
        "pooled_history_cosine": round(mean_pairwise_cosine(pooled), 4),
        # Share of the pooled vectors' energy that is not the mean over users: what can tell users apart.
        "pooled_history_user_specific_share": round(float(centered.pow(2).sum() / pooled.pow(2).sum()), 4),
        "pooled_history_cosine_centered": round(mean_pairwise_cosine(centered), 4),
    }


@torch.no_grad()
def attention_report(model, encoded, batch_size: int = 32) -> dict:
    """α's normalized entropy and largest weight, the share of users whose queries all attend most to the same
    record, and the RMS of the two prefix parts (P_q's projection, P_u's row) before the embedding scale."""
    model.eval()
    prefix = model.prefix
    ent, top, n = 0.0, 0.0, 0
    tops: dict[str, set] = defaultdict(set)
    pq_sq, pu_sq, rows = 0.0, 0.0, 0
    for i in range(0, len(encoded.items), batch_size):
        items = encoded.items[i : i + batch_size]
        P, alpha = model.prefix_for(items, encoded.vectors)
        for j, item in enumerate(items):
            k = len(item.hist_rows)
            if k > 1 and prefix.cfg.use_pq:
                a = alpha[j, :k].clamp_min(1e-12)
                ent += float(-(a * a.log()).sum()) / math.log(k)
                top += float(a.max())
                n += 1
                tops[item.user_id].add(int(a.argmax()))
        if prefix.cfg.use_pq and getattr(prefix, "last_pooled", None) is not None:
            pq_sq += float(prefix.proj(prefix.last_pooled).pow(2).sum())
        if prefix.cfg.use_pu:
            user_rows = torch.tensor([it.user_row for it in items], device=P.device)
            pu_sq += float(prefix.user_table(user_rows).pow(2).sum())
        rows += len(items) * prefix.L * prefix.d
    multi = [u for u, s in tops.items() if sum(1 for it in encoded.items if it.user_id == u) > 1]
    same = sum(1 for u in multi if len(tops[u]) == 1)
    return {
        "alpha_normalized_entropy": round(ent / max(n, 1), 4),
        "alpha_mean_max": round(top / max(n, 1), 4),
        "users_with_one_top_record": round(same / len(multi), 4) if multi else None,
        "pq_rms": round(math.sqrt(pq_sq / max(rows, 1)), 4) if prefix.cfg.use_pq else 0.0,
        "pu_rms": round(math.sqrt(pu_sq / max(rows, 1)), 4) if prefix.cfg.use_pu else 0.0,
    }


def train_sample(examples: list[Example], n: int, seed: int = 0) -> list[Example]:
    """Up to n Stage-2 training examples, spread over users (each user's most recent first)."""
    by_user: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        by_user[ex.user_id].append(ex)
    out: list[Example] = []
    depth = 0
    while len(out) < n and any(len(v) > depth for v in by_user.values()):
        for u in sorted(by_user):
            if len(by_user[u]) > depth and len(out) < n:
                out.append(by_user[u][-1 - depth])
        depth += 1
    return out
