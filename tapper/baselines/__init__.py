"""Baselines on the same Stage-1 merged backbone and splits as TAP-PER (issue 4).

Importing this package registers its variants with `tapper.variants`:

    rag-kN      BM25 top-N of the user's own history in the prompt (LaMP's RAG); rag-k1, rag-k2, rag-k4
    pag-kN      a backbone-written user profile + BM25 top-N (N = 0: profile only); pag-k0, pag-k1
    oppu        one LoRA (r=8, q_proj/v_proj) per user, trained on that user's history
    oppu-rag    oppu + BM25 top-1 in the prompt (training and evaluation)
    oppu-pag    oppu-rag + the PAG profile
    ref-count, ref-count-lastK, ref-ridge
                reference rows (tapper.baselines.readout): the history read without the prefix, fused with the
                Stage-1 backbone's label probabilities; yardsticks for what the inputs hold, not methods

(`base` and `pq-only` are TAP-PER's own: the merged backbone alone, and TAP-PER with use_pu=False.)
Each variant is called as fn(variant=, stage1_dir=, data=, cfg=, out_dir=, progress=, log=) and
returns a `tapper.experiment.VariantResult`.
"""
from __future__ import annotations

import re

from tapper.baselines.oppu import run_oppu
from tapper.baselines.prompted import PromptSpec, run_prompted
from tapper.baselines.readout import PATTERN as REFERENCE, run_readout
from tapper.variants import EXTRA_PATTERNS, EXTRA_VARIANTS

OPPU_SPECS = {"oppu": PromptSpec(k=0, profile=False), "oppu-rag": PromptSpec(k=1, profile=False), "oppu-pag": PromptSpec(k=1, profile=True)}
RAG = re.compile(r"rag-k(\d+)")
PAG = re.compile(r"pag-k(\d+)")


def prompt_spec(variant: str) -> PromptSpec:
    m = RAG.fullmatch(variant)
    if m:
        if int(m.group(1)) < 1:
            raise ValueError(f"{variant}: RAG needs k >= 1 (k = 0 is `base`)")
        return PromptSpec(k=int(m.group(1)), profile=False)
    m = PAG.fullmatch(variant)
    if m:
        return PromptSpec(k=int(m.group(1)), profile=True)
    raise ValueError(f"{variant!r} is not a RAG/PAG variant")


def rag_or_pag(variant, stage1_dir, data, cfg, out_dir, progress=True, log=None):
    return run_prompted(variant, prompt_spec(variant), stage1_dir, data, cfg, out_dir, progress, log)


def oppu(variant, stage1_dir, data, cfg, out_dir, progress=True, log=None):
    return run_oppu(variant, OPPU_SPECS[variant], stage1_dir, data, cfg, out_dir, progress, log)


def register() -> None:
    for name in OPPU_SPECS:
        EXTRA_VARIANTS.setdefault(name, oppu)
    if all(p.pattern != REFERENCE.pattern for p, _ in EXTRA_PATTERNS):
        EXTRA_PATTERNS.append((REFERENCE, run_readout))
    for pattern in (RAG, PAG):
        if all(p.pattern != pattern.pattern for p, _ in EXTRA_PATTERNS):
            EXTRA_PATTERNS.append((pattern, rag_or_pag))


register()
