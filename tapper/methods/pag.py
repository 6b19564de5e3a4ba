"""PAG (Richardson et al., 2023): a profile the backbone writes from the user's history, plus the BM25 top-N
records, in the prompt (N = 0: the profile alone)."""

from __future__ import annotations

import re

from tapper.methods.prompted import PromptSpec, run_prompted
from tapper.methods.registry import Method

PATTERN = r"pag-k(\d+)"


def spec(variant: str) -> PromptSpec:
    return PromptSpec(k=int(re.fullmatch(PATTERN, variant).group(1)), profile=True)


def run(variant, stage1_dir, data, cfg, out_dir, progress=True, log=None):
    return run_prompted(variant, spec(variant), stage1_dir, data, cfg, out_dir, progress, log)


METHODS = (
    Method(
        "pag-kN",
        "pag",
        "a backbone-written user profile + BM25 top-N in the prompt (pag-k0, pag-k1)",
        run,
        pattern=PATTERN,
    ),
)
