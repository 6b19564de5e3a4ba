"""Named methods that `tapper experiment --variants` evaluates on one split.

TAP-PER ablations are switches of one Stage-2 model (DESIGN.md), so a variant
name maps to Stage-2 config overrides:

    tap-per        the full model, with the run's Stage-2 settings
    tap-per-paper  the full model as the paper describes it: the departures we made (standardized P_q
                   inputs, a bridge on the prefix positions only, bounded DIN scores, history dropout,
                   the auxiliary answer readout, epoch selection on held-out examples) switched off
    no-bridge      -bridge          no-pq    -P_q          no-pu / pq-only   -P_u
    lambda-t0      λ_t = 0          lambda-o0  λ_o = 0     lambda0   both 0
    bm25-kN        BM25 pre-filter keeping N records before the attention
    L-N            prefix length N

`base` is the Stage-1 merged backbone without any prefix. Other families
(RAG, PAG, OPPU) register themselves in `EXTRA_VARIANTS`.
"""
from __future__ import annotations

import re
from typing import Callable

# The paper's configuration: every departure of Stage2Config from it reset (see tapper.config.Stage2Config).
PAPER = {"input_norm": "unit_rms", "bridge_scope": "all", "din_score_bound": None, "history_dropout": 0.0,
         "aux_weight": 0.0, "validation_share": 0.0}

SWITCHES: dict[str, dict] = {
    "tap-per": {},
    "tap-per-paper": PAPER,
    "no-bridge": {"use_bridge": False},
    "no-pq": {"use_pq": False},
    "no-pu": {"use_pu": False},
    # P_q-only: no per-user parameters; serves users never seen in training.
    "pq-only": {"use_pu": False},
    "lambda-t0": {"use_lambda_t": False},
    "lambda-o0": {"use_lambda_o": False},
    "lambda0": {"use_lambda_t": False, "use_lambda_o": False},
}

# name -> callable(ctx) -> {example id: prediction}; filled by tapper.baselines.
EXTRA_VARIANTS: dict[str, Callable] = {}
EXTRA_PATTERNS: list[tuple[re.Pattern, Callable]] = []


def stage2_overrides(name: str) -> dict | None:
    """Stage-2 config overrides for a TAP-PER variant name, or None if it is not one."""
    if name in SWITCHES:
        return dict(SWITCHES[name])
    m = re.fullmatch(r"bm25-k(\d+)", name)
    if m:
        return {"bm25_k": int(m.group(1))}
    m = re.fullmatch(r"L-?(\d+)", name)
    if m:
        return {"prefix_len": int(m.group(1))}
    return None


def _register_baselines() -> None:
    import tapper.baselines  # noqa: F401  (registers RAG, PAG and OPPU in EXTRA_VARIANTS / EXTRA_PATTERNS)


def extra_variant(name: str) -> Callable | None:
    _register_baselines()
    if name in EXTRA_VARIANTS:
        return EXTRA_VARIANTS[name]
    for pattern, fn in EXTRA_PATTERNS:
        if pattern.fullmatch(name):
            return fn
    return None


def check_variants(names: list[str]) -> None:
    _register_baselines()
    bad = [n for n in names if n != "base" and stage2_overrides(n) is None and extra_variant(n) is None]
    if bad:
        known = ["base", *SWITCHES, "bm25-kN", "L-N", *EXTRA_VARIANTS] + [p.pattern for p, _ in EXTRA_PATTERNS]
        raise ValueError(f"unknown variant(s) {bad}; known: {', '.join(known)}")
