"""Batched greedy generation for every variant, and the LaMP-format predictions it yields."""

from __future__ import annotations

from tapper.progress import tqdm  # a bar on a terminal, log lines elsewhere (pipeline steps)

from tapper.model.prefixed_lm import PrefixedLM
from tapper.model.tapper import TapPer
from tapper.train.features import EncodedSet, lm_generate_batch


def default_max_new_tokens(task) -> int:
    return 32 if task.kind == "generation" else 8


def generate_texts(
    model: TapPer | PrefixedLM,
    encoded: EncodedSet,
    tokenizer,
    task,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    progress: bool = True,
    desc: str = "generating",
) -> dict[str, str]:
    """{example id: parsed prediction}, in the order of `encoded.items`. A PrefixedLM gets no prefix (the
    non-personalized base).

    Batches are cut from the examples sorted by prompt length (longest first, so a batch that does not fit
    fails at once), so a batch's prompts are left-padded to a length close to their own, not to the longest
    prompt among arbitrary neighbours. Each example's greedy output does not depend on its batch (left padding
    is masked and positions start at the first real token; tests/test_core.py), so the order changes no
    prediction. The vectors are moved to the model's device once, not per batch."""
    max_new = max_new_tokens or default_max_new_tokens(task)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    model.eval()
    items = encoded.items
    order = sorted(range(len(items)), key=lambda i: -len(items[i].prompt_ids))  # stable: ties keep their order
    vectors = encoded.vectors.to(model.plm.device) if isinstance(model, TapPer) else None
    out_of: dict[int, str] = {}
    label = desc if desc == "generating" else f"generating ({desc})"
    for b in tqdm(range(0, len(order), batch_size), desc=label, disable=not progress, leave=False):
        picked = order[b : b + batch_size]
        chunk = [items[i] for i in picked]
        if isinstance(model, TapPer):
            out = model.generate(chunk, vectors, pad, eos, max_new)
        else:
            out = model.generate(lm_generate_batch(chunk, pad), None, max_new, eos)
        for i, ids in zip(picked, out):
            out_of[i] = task.parse_prediction(tokenizer.decode(ids, skip_special_tokens=True))
    return {items[i].id: out_of[i] for i in range(len(items))}
