"""PAG: a natural-language profile of each user, written by the backbone from their history.

Richardson et al. (and OPPU after them) summarise a user's history with an LLM
and put the summary in front of the prompt. Here the summary is written by
the same backbone every other method uses (the Stage-1 merged model; any
other HF directory can be passed instead), greedily, from the user's
`n_records` most recent records. A chat template is used when the tokenizer
has one (SmolLM2-Instruct does), plain text otherwise.

Profiles are cached on disk per user, keyed by the generating weights, the
exact prompt and the generation length, so a second run (or OPPU-pag after
PAG) generates nothing.

Each example gets the profile of its own history: a query's is made from its
user's full profile, an OPPU-pag training example's only from the records
before it. (OPPU makes one profile per user from the full history and trains
on it too, so a training example's profile has seen the record it predicts.)
Profiles are cached by prompt, so examples with the same recent history share one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tapper.atomic import atomic_write_json
from tapper.data.types import Record
from tapper.model.prefixed_lm import LMBatch, PrefixedLM
from tapper.paths import cache_dir

INSTRUCTION = "Summarize this user's preferences in one or two short sentences, based on their history above."


@dataclass
class ProfileConfig:
    n_records: int = 8  # most recent records summarised
    record_tokens: int = 48  # each record's text is cut to this many tokens
    max_new_tokens: int = 48
    batch_size: int = 8


def profile_prompt(task, history: list[Record], tokenizer, cfg: ProfileConfig) -> str:
    lines = []
    for r in history[-cfg.n_records :]:
        ids = tokenizer(task.record_text(r), add_special_tokens=False)["input_ids"][: cfg.record_tokens]
        lines.append("- " + tokenizer.decode(ids, skip_special_tokens=True).strip())
    body = "User history (most recent last):\n" + "\n".join(lines) + "\n\n" + INSTRUCTION
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True
        )
    return body + "\nProfile:"


def _cache_key(weights_key: str, prompt: str, cfg: ProfileConfig) -> str:
    return hashlib.sha256(json.dumps([weights_key, prompt, cfg.max_new_tokens]).encode()).hexdigest()


class ProfileWriter:
    """Generates (and caches) PAG profiles with one backbone."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        weights_key: str,
        cfg: ProfileConfig | None = None,
        root: Path | None = None,
    ):
        self.plm = PrefixedLM(model)
        self.tok = tokenizer
        self.weights_key = weights_key
        self.cfg = cfg or ProfileConfig()
        self.dir = Path(root or cache_dir() / "profiles")
        self.generated = 0
        self.reused = 0

    def _generate(self, prompts: list[str]) -> list[str]:
        eos = self.tok.eos_token_id
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else eos
        out = []
        for b in range(0, len(prompts), self.cfg.batch_size):
            chunk = [self.tok(p, add_special_tokens=False)["input_ids"] for p in prompts[b : b + self.cfg.batch_size]]
            T = max(len(c) for c in chunk)
            ids = torch.full((len(chunk), T), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), T), dtype=torch.long)
            for i, c in enumerate(chunk):
                ids[i, T - len(c) :] = torch.tensor(c)
                mask[i, T - len(c) :] = 1
            gen = self.plm.generate(LMBatch(ids, mask), None, self.cfg.max_new_tokens, eos)
            out.extend(" ".join(self.tok.decode(g, skip_special_tokens=True).split()) for g in gen)
        return out

    def profiles(self, task, histories: dict[str, list[Record]]) -> dict[str, str]:
        """{key: profile} for {key: history} (keys are example ids); an empty history gets an empty profile."""
        prompts = {u: profile_prompt(task, h, self.tok, self.cfg) for u, h in histories.items() if h}
        result: dict[str, str] = {u: "" for u, h in histories.items() if not h}
        todo: list[tuple[str, str, Path]] = []
        for u, p in prompts.items():
            path = self.dir / f"{_cache_key(self.weights_key, p, self.cfg)}.json"
            if path.exists():
                result[u] = json.loads(path.read_text())["profile"]
                self.reused += 1
            else:
                todo.append((u, p, path))
        if todo:
            texts = self._generate([p for _, p, _ in todo])
            for (u, p, path), text in zip(todo, texts):
                atomic_write_json(path, {"profile": text, "prompt": p})
                result[u] = text
            self.generated += len(todo)
        return result
