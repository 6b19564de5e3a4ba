"""Prompt-based baselines on the Stage-1 merged backbone: RAG (k = 1, 2, 4) and PAG (k = 0, 1).

No parameter changes: the merged backbone reads the augmented prompt and
answers greedily, exactly like `base` but with the user's retrieved records
(and, for PAG, their profile) written into the input.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tapper.atomic import atomic_write_json
from tapper.methods.profile import ProfileConfig, ProfileWriter
from tapper.methods.retrieval import Augmented, augment
from tapper.data.bm25 import Bm25Index
from tapper.data.types import Example
from tapper.eval.predict import default_max_new_tokens, generate_texts
from tapper.train.features import EncodedExample, EncodedSet, FeatureEncoder


def baseline_max_len(cfg) -> int:
    """Prompt length for the baselines: the personalization stage's, as TAP-PER uses."""
    return int(cfg.stage2.max_len)


def encode_augmented(
    task, tokenizer, examples: list[Example], k: int, max_len: int, profiles: dict[str, str] | None = None
) -> tuple[EncodedSet, dict[str, Augmented]]:
    """Token ids of each example with its top-k records (and profile, keyed by example id) in the prompt.

    The vectors of the returned set are empty: prompt-based methods have no prefix.
    """
    enc = FeatureEncoder(task, tokenizer, cache=None, max_len=max_len)
    items, augmented = [], {}
    indexes: dict[str, Bm25Index] = {}  # one BM25 index per user: their records tokenized once
    for ex in examples:
        if ex.target is not None:
            reserve = len(tokenizer(task.format_target(ex.target), add_special_tokens=False)["input_ids"]) + 1
        else:
            reserve = default_max_new_tokens(task)
        aug = augment(
            task,
            ex,
            k,
            tokenizer,
            max_len,
            reserve=reserve,
            profile=(profiles or {}).get(ex.id),
            index=indexes.setdefault(ex.user_id, Bm25Index()),
        )
        augmented[ex.id] = aug
        prompt_ids, target_ids = enc.tokenize(aug.text, ex.target)
        items.append(
            EncodedExample(
                id=ex.id,
                user_id=ex.user_id,
                user_row=0,
                q_row=0,
                hist_rows=[],
                dt=[],
                dpi=[],
                prompt_ids=prompt_ids,
                target_ids=target_ids,
                target=ex.target,
                history_ids=[r.id for r in aug.records],
            )
        )
    return EncodedSet(items=items, vectors=torch.zeros(0, 1)), augmented


def make_profiles(
    model,
    tokenizer,
    task,
    examples: list[Example],
    progress: bool = True,
    cfg: ProfileConfig | None = None,
    model_hash: str | None = None,
) -> tuple[dict[str, str], ProfileWriter]:
    """{example id: profile} made from each example's own history: a query's is its user's full profile, a
    training example's only the records before it (never the record it was made from). `model_hash` keys the
    profile cache (a loaded Backbone's weights_hash); without it the module's tensors are hashed."""
    from tapper.model.backbone import tensor_hash

    writer = ProfileWriter(model, tokenizer, model_hash or tensor_hash(model), cfg)
    return writer.profiles(
        task, {ex.id: [r for r in ex.history if r.id != ex.source_record_id] for ex in examples}
    ), writer


@dataclass(frozen=True)
class PromptSpec:
    k: int
    profile: bool


def write_audit(out_dir: Path, variant: str, augmented: dict[str, Augmented], profiles: dict[str, str] | None) -> Path:
    """baselines/<variant>/prompts.json: what each query was given (retrieved ids, profile, prompt text)."""
    path = Path(out_dir) / "baselines" / variant / "prompts.json"
    atomic_write_json(
        path,
        {
            "retrieved": {i: [r.id for r in a.records] for i, a in augmented.items()},
            "profiles": profiles or {},
            "prompts": {i: a.text for i, a in list(augmented.items())[:20]},  # a sample, for reading
        },
    )
    return path


def run_prompted(variant: str, spec: PromptSpec, stage1_dir, data, cfg, out_dir, progress=True, log=None):
    from tapper.methods.result import VariantResult, score
    from tapper.model.backbone import load_backbone_dir
    from tapper.model.prefixed_lm import PrefixedLM

    t0 = time.time()
    bb = load_backbone_dir(stage1_dir)
    task, evals = data.task, data.splits.eval
    profiles, writer = (
        make_profiles(bb.model, bb.tokenizer, task, evals, progress, model_hash=bb.weights_hash)
        if spec.profile
        else (None, None)
    )
    encoded, augmented = encode_augmented(task, bb.tokenizer, evals, spec.k, baseline_max_len(cfg), profiles)
    preds = generate_texts(
        PrefixedLM(bb.model),
        encoded,
        bb.tokenizer,
        task,
        cfg.eval.batch_size,
        cfg.eval.max_new_tokens,
        progress,
        variant,
    )
    write_audit(out_dir, variant, augmented, profiles)
    extra = {
        "k": spec.k,
        "mean_prompt_tokens": round(sum(len(i.prompt_ids) for i in encoded.items) / max(len(encoded.items), 1), 1),
    }
    if writer is not None:
        extra.update(profiles_generated=writer.generated, profiles_reused=writer.reused)
    # Nothing trained, nothing stored per user but text (the profile, for PAG).
    return VariantResult(
        variant, preds, score(data, preds), per_user_params=0, shared_params=0, seconds=time.time() - t0, extra=extra
    )
