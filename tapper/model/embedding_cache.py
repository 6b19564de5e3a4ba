"""Content-addressed cache of record and query vectors.

A vector is the mean of the *frozen input-embedding rows* of a text's tokens
(paper 2.2). It depends only on the input-embedding matrix, the tokenizer and
the text, so the cache is keyed by exactly those three hashes. The embedding
layer never trains (Stage 1 targets attention projections only, Stage 2
freezes the backbone), so vectors computed once serve every later run.

On disk: `<root>/<emb-hash>-<tok-hash>/vectors.safetensors` (one float32
matrix) + `index.json` (text hash -> row). New vectors are appended by
writing both files to temp names and renaming, index last, so a crash
leaves the previous complete state.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from tapper.atomic import atomic_write, atomic_write_json
from tapper.model.backbone import embedding_hash, tokenizer_hash


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class CacheStats:
    computed: int = 0
    reused: int = 0


class EmbeddingCache:
    def __init__(self, root: str | Path, model: torch.nn.Module, tokenizer, max_tokens: int = 512):
        self.emb = model.get_input_embeddings().weight.detach().float().cpu()
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.key = f"{embedding_hash(model)[:16]}-{tokenizer_hash(tokenizer)[:16]}"
        self.dir = Path(root) / self.key
        self.dir.mkdir(parents=True, exist_ok=True)
        self.stats = CacheStats()
        self._index: dict[str, int] = {}
        self._vectors = torch.zeros(0, self.emb.shape[1])
        if (self.dir / "index.json").exists():
            self._index = json.loads((self.dir / "index.json").read_text())
            self._vectors = load_file(self.dir / "vectors.safetensors")["vectors"]
            # The index is written last; rows past it are from an interrupted write.
            self._vectors = self._vectors[: len(self._index)]

    @property
    def dim(self) -> int:
        return int(self.emb.shape[1])

    def __len__(self) -> int:
        return len(self._index)

    def encode(self, texts: list[str], batch_size: int = 256, progress: bool = True) -> torch.Tensor:
        """Vectors for `texts` ([n, d]); computes only the ones not in the cache, then saves."""
        hashes = [text_hash(t) for t in texts]
        missing: dict[str, str] = {}
        for h, t in zip(hashes, texts):
            if h not in self._index and h not in missing:
                missing[h] = t
        self.stats.reused += len(texts) - len(missing)
        self.stats.computed += len(missing)
        if missing:
            items = list(missing.items())
            new_rows = []
            for i in tqdm(range(0, len(items), batch_size), desc="embedding records", disable=not progress or len(items) < 2 * batch_size):
                chunk = [t for _, t in items[i : i + batch_size]]
                new_rows.append(self._mean_embed(chunk))
            start = len(self._index)
            self._vectors = torch.cat([self._vectors] + new_rows, dim=0)
            for j, (h, _) in enumerate(items):
                self._index[h] = start + j
            self._save()
        rows = torch.tensor([self._index[h] for h in hashes], dtype=torch.long)
        return self._vectors[rows] if len(rows) else torch.zeros(0, self.dim)

    def _mean_embed(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=self.max_tokens, padding=True, return_tensors="pt")
        mask = enc["attention_mask"].unsqueeze(-1).float()  # padding excluded from the mean
        vecs = self.emb[enc["input_ids"]] * mask
        return vecs.sum(1) / mask.sum(1).clamp(min=1.0)

    def _save(self) -> None:
        atomic_write(self.dir / "vectors.safetensors", lambda tmp: save_file({"vectors": self._vectors.contiguous()}, tmp))
        atomic_write_json(self.dir / "index.json", self._index)
