"""RAG (LaMP's retrieval baseline): the BM25 top-N records of the user's own history in the prompt, read by
the Stage-1 merged backbone. Nothing is trained and nothing is stored per user."""

from __future__ import annotations

import re

from tapper.methods.prompted import PromptSpec, run_prompted
from tapper.methods.registry import Method

PATTERN = r"rag-k(\d+)"


def spec(variant: str) -> PromptSpec:
    k = int(re.fullmatch(PATTERN, variant).group(1))
    if k < 1:
        raise ValueError(f"{variant}: RAG needs k >= 1 (k = 0 is `base`)")
    return PromptSpec(k=k, profile=False)


def run(variant, stage1_dir, data, cfg, out_dir, progress=True, log=None):
    return run_prompted(variant, spec(variant), stage1_dir, data, cfg, out_dir, progress, log)


METHODS = (
    Method(
        "rag-kN", "rag", "BM25 top-N of the user's own history in the prompt (rag-k1, rag-k4)", run, pattern=PATTERN
    ),
)
