"""Content-addressed cache of record and query vectors.

A vector is the mean of the *frozen input-embedding rows* of a text's tokens
(paper 2.2). It depends only on the input-embedding matrix, the tokenizer and
the text (read up to `max_tokens` tokens), so the cache is keyed by exactly those. The embedding
layer never trains (Stage 1 targets attention projections only, Stage 2
freezes the backbone), so vectors computed once serve every later run.

On disk, `<root>/<emb-hash>-<tok-hash>/` (a VectorStore):
    shard-<id>.safetensors  one float32 matrix "vectors"; its rows' text hashes in the file's metadata
    manifest.json           {"format": 2, "shards": [{"file", "rows"}, ...]}: the shards that count
New vectors go to a new shard, written under a temporary name and renamed, and
the manifest is rewritten last, so an append costs the new rows (not the whole
matrix, as the first format did) and a crash leaves the previous complete
state. Appends hold a file lock and re-read the manifest, so two runs sharing
the cache (a sweep's parallel runs) both keep their shards. Past MAX_SHARDS
shards the next append compacts everything into one. The first format
(`vectors.safetensors` + `index.json`) is still read, and converted on the
next append.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tapper.progress import tqdm  # a bar on a terminal, log lines elsewhere (pipeline steps)

from tapper.atomic import atomic_write, atomic_write_json, file_lock
from tapper.model.backbone import embedding_hash, tokenizer_hash


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


MANIFEST = "manifest.json"
MAX_SHARDS = 32
LEGACY_VECTORS, LEGACY_INDEX = "vectors.safetensors", "index.json"


class VectorStore:
    """The on-disk side of the cache: text hash -> vector, appended in shards (format in the module doc)."""

    def __init__(self, directory: str | Path, dim: int):
        self.dir = Path(directory)
        self.dim = dim

    def _manifest(self) -> list[dict]:
        path = self.dir / MANIFEST
        return json.loads(path.read_text())["shards"] if path.exists() else []

    def _read_shards(self, vectors: bool, attempts: int = 3) -> list[tuple[list[str], torch.Tensor | None]]:
        """Every shard of the manifest as (hashes, matrix or None). A compaction in another process may
        delete the shards of the manifest just read (after writing its own); then read the new one."""
        for attempt in range(attempts):
            try:
                out = []
                for shard in self._manifest():
                    with safe_open(self.dir / shard["file"], framework="pt") as f:
                        out.append((json.loads(f.metadata()["hashes"]), f.get_tensor("vectors") if vectors else None))
                return out
            except FileNotFoundError:
                if attempt == attempts - 1:
                    raise
        return []

    def known(self) -> set[str]:
        """The stored text hashes, read without loading any vector."""
        if (self.dir / MANIFEST).exists():
            return {h for hashes, _ in self._read_shards(vectors=False) for h in hashes}
        if (self.dir / LEGACY_INDEX).exists():
            return set(json.loads((self.dir / LEGACY_INDEX).read_text()))
        return set()

    def load(self) -> tuple[dict[str, int], torch.Tensor]:
        """(text hash -> row, [n, dim] matrix) of everything stored; the first copy of a hash wins."""
        index: dict[str, int] = {}
        parts: list[torch.Tensor] = []
        n = 0

        def add(hashes: Sequence[str], vectors: torch.Tensor) -> None:
            nonlocal n
            keep = [j for j, h in enumerate(hashes) if h not in index]
            for j in keep:
                index[hashes[j]] = n
                n += 1
            parts.append(vectors[keep] if len(keep) < len(hashes) else vectors)

        if (self.dir / MANIFEST).exists():
            for hashes, vectors in self._read_shards(vectors=True):
                add(hashes, vectors)
        elif (self.dir / LEGACY_INDEX).exists():
            legacy = json.loads((self.dir / LEGACY_INDEX).read_text())
            # The index was written last; rows past it are from an interrupted write.
            vectors = load_file(self.dir / LEGACY_VECTORS)["vectors"][: len(legacy)]
            add(sorted(legacy, key=legacy.get), vectors)
        return index, (torch.cat(parts) if parts else torch.zeros(0, self.dim))

    def append(self, hashes: Sequence[str], vectors: torch.Tensor) -> None:
        """Store new rows as one shard; compacts (or converts the first format) when due."""
        if not len(hashes):
            return
        with file_lock(self.dir / ".lock"):
            shards = self._manifest()
            legacy = not shards and (self.dir / LEGACY_INDEX).exists()
            if not legacy and len(shards) < MAX_SHARDS:
                shards.append(self._write_shard(hashes, vectors))
                atomic_write_json(self.dir / MANIFEST, {"format": 2, "shards": shards})
                return
            # Compaction: everything stored plus the new rows, once each, in one shard.
            index, stored = self.load()
            new = {}
            for j, h in enumerate(hashes):
                if h not in index:
                    new.setdefault(h, j)
            everything = sorted(index, key=index.get) + list(new)
            merged = torch.cat([stored, vectors[list(new.values())]])
            shard = self._write_shard(everything, merged)
            atomic_write_json(self.dir / MANIFEST, {"format": 2, "shards": [shard]})
            # Only now, with the new manifest in place, are the old files unreferenced.
            for old in [s["file"] for s in shards] + ([LEGACY_VECTORS, LEGACY_INDEX] if legacy else []):
                (self.dir / old).unlink(missing_ok=True)

    def _write_shard(self, hashes: Sequence[str], vectors: torch.Tensor) -> dict:
        name = f"shard-{uuid.uuid4().hex[:16]}.safetensors"
        metadata = {"hashes": json.dumps(list(hashes))}
        atomic_write(self.dir / name, lambda tmp: save_file({"vectors": vectors.contiguous()}, tmp, metadata=metadata))
        return {"file": name, "rows": len(hashes)}


@dataclass
class CacheStats:
    computed: int = 0
    reused: int = 0


class EmbeddingCache:
    def __init__(self, root: str | Path, model: torch.nn.Module, tokenizer, max_tokens: int = 512):
        self.emb = model.get_input_embeddings().weight.detach().float().cpu()
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        # A vector depends on the embedding matrix, the tokenizer and how many tokens of a text are read.
        self.key = f"{embedding_hash(model)[:16]}-{tokenizer_hash(tokenizer)[:16]}-t{max_tokens}"
        self.dir = Path(root) / self.key
        self.dir.mkdir(parents=True, exist_ok=True)
        self.stats = CacheStats()
        self.store = VectorStore(self.dir, int(self.emb.shape[1]))
        self._index, self._vectors = self.store.load()

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
            for i in tqdm(
                range(0, len(items), batch_size),
                desc="embedding records",
                disable=not progress or len(items) < 2 * batch_size,
            ):
                chunk = [t for _, t in items[i : i + batch_size]]
                new_rows.append(self._mean_embed(chunk))
            start = len(self._index)
            added = torch.cat(new_rows, dim=0)
            self._vectors = torch.cat([self._vectors, added], dim=0)
            for j, (h, _) in enumerate(items):
                self._index[h] = start + j
            self.store.append([h for h, _ in items], added)
        rows = torch.tensor([self._index[h] for h in hashes], dtype=torch.long)
        return self._vectors[rows] if len(rows) else torch.zeros(0, self.dim)

    def _mean_embed(self, texts: list[str]) -> torch.Tensor:
        """Mean embedding row per text (zero for a text with no tokens), one bag per text.

        embedding_bag reads the rows of each text's own tokens and averages them: no padded [texts, max_tokens, d]
        gather (256 x 512 x d floats per chunk, 2 GB at d = 4096), no padding rows multiplied by zero."""
        ids = self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=self.max_tokens)["input_ids"]
        lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
        flat = torch.tensor([t for x in ids for t in x], dtype=torch.long)
        offsets = torch.cumsum(lengths, 0) - lengths
        return F.embedding_bag(flat, self.emb, offsets, mode="mean")
