"""Batched greedy generation for every variant, and the LaMP-format predictions it yields."""
from __future__ import annotations

from tapper.progress import tqdm  # a bar on a terminal, log lines elsewhere (pipeline steps)

from tapper.model.prefixed_lm import PrefixedLM
from tapper.model.tapper import TapPer
from tapper.train.features import EncodedSet, lm_generate_batch


def default_max_new_tokens(task) -> int:
    return 32 if task.kind == "generation" else 8


def generate_texts(model: TapPer | PrefixedLM, encoded: EncodedSet, tokenizer, task, batch_size: int = 16,
                   max_new_tokens: int | None = None, progress: bool = True, desc: str = "generating") -> dict[str, str]:
    """{example id: parsed prediction}. A PrefixedLM gets no prefix (the non-personalized base)."""
    max_new = max_new_tokens or default_max_new_tokens(task)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    model.eval()
    preds: dict[str, str] = {}
    items = encoded.items
    label = desc if desc == "generating" else f"generating ({desc})"
    for b in tqdm(range(0, len(items), batch_size), desc=label, disable=not progress, leave=False):
        chunk = items[b : b + batch_size]
        if isinstance(model, TapPer):
            out = model.generate(chunk, encoded.vectors, pad, eos, max_new)
        else:
            out = model.generate(lm_generate_batch(chunk, pad), None, max_new, eos)
        for it, ids in zip(chunk, out):
            preds[it.id] = task.parse_prediction(tokenizer.decode(ids, skip_special_tokens=True))
    return preds
