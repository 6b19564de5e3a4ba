"""One loaded model bundle and the live per-user state on top of it, as the serving threads share it.

`Loaded` is replaced as a whole on /reload. Inside it, the per-user state (the user table's rows and its id
list, the history store, the generation and sequence it reflects, each user's last feedback time) changes as
feedback arrives, and every change is made under `Loaded.lock`, briefly: a row write, a user added or deleted,
a history list replaced. Predictions take the same lock while they read a batch's histories and rows and compute
its prefixes (milliseconds), then generate without it. So a prediction sees one consistent state, never a row
from after a feedback with the history from before it, and never waits for a feedback's training, its disk
writes or a compaction (those hold the service's writer lock, deploy.service).

Copy-on-write: writers replace a user's history list, they never extend it in place, so a reader may keep the
list it took under the lock.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import get_peft_model_state_dict
from safetensors import safe_open
from torch import nn

from deploy.bundle import BundleInfo, read_histories
from deploy.histories import HistoryStore
from deploy.journal import StateError, is_tombstone
from tapper.model.embedding_cache import EmbeddingCache
from tapper.train.features import FeatureEncoder

# Record/query vectors kept per process (LRU): a user's history is embedded again at every prediction otherwise.
# 16,384 vectors are ~38 MB with SmolLM2 (d=576).
VECTOR_CACHE_ENTRIES = 16_384


class ServingVectors(EmbeddingCache):
    """Record/query vectors computed on the fly, kept in a bounded in-memory LRU, never written to disk.

    A vector is a mean of frozen input-embedding rows (no forward pass), the same `_mean_embed` as training, so
    the vectors are the ones the model was trained on. The on-disk EmbeddingCache would write a shard for every
    new query text, which nothing reads again. Not thread-safe (the tokenizer is not): each thread that encodes
    (the batch worker, the feedback trainer) has its own instance and tokenizer.
    """

    def __init__(self, model: nn.Module, tokenizer, max_tokens: int = 512, entries: int = VECTOR_CACHE_ENTRIES):
        with tempfile.TemporaryDirectory(prefix="tapper-vectors-") as tmp:
            super().__init__(tmp, model, tokenizer, max_tokens)
        self.dir = None
        self.entries = entries
        self._lru: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    def encode(self, texts: list[str], batch_size: int = 256, progress: bool = True) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.dim)
        keys = [hashlib.blake2b(t.encode("utf-8"), digest_size=16).digest() for t in texts]
        missing = {}
        for k, t in zip(keys, texts):
            if k in self._lru:
                self._lru.move_to_end(k)
            else:
                missing.setdefault(k, t)
        self.stats.reused += len(texts) - len(missing)
        self.stats.computed += len(missing)
        fresh: dict[bytes, torch.Tensor] = {}
        if missing:
            todo = list(missing.items())
            for i in range(0, len(todo), batch_size):
                chunk = todo[i : i + batch_size]
                for (k, _), v in zip(chunk, self._mean_embed([t for _, t in chunk])):
                    fresh[k] = v
        out = torch.stack([fresh[k] if k in fresh else self._lru[k] for k in keys])
        for k, v in fresh.items():
            self._lru[k] = v
        while len(self._lru) > self.entries:
            self._lru.popitem(last=False)
        return out


class ServingEncoder(FeatureEncoder):
    """The Stage-2 feature encoder, except that a prompt is cut to what can fit *before* it is tokenized.

    FeatureEncoder tokenizes the whole prompt and then keeps its head and its last tokens. A request's text is
    bounded (Limits.max_text_chars), but tokenizing only what can survive the cut keeps the cost of a prompt
    bounded by max_len whatever that limit is set to: no token is longer than `max_token_chars` characters, so
    the kept head and tail lie within `room` characters of each end. (A single word straddling the cut may
    tokenize differently at the cut, which lies past the kept head and before the kept tail.)"""

    def __init__(self, *args, max_token_chars: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.room = 2 * max(1, self.max_len - self.prefix_len) * max_token_chars

    def tokenize(self, prompt: str, target: str | None) -> tuple[list[int], list[int]]:
        if len(prompt) > 2 * self.room:
            prompt = prompt[: self.room] + prompt[-self.room :]
        return super().tokenize(prompt, target)


def max_token_chars(tokenizer) -> int:
    """An upper bound on the characters one token covers (byte-level tokens: one character per byte or more)."""
    vocab = tokenizer.get_vocab()
    return max((len(t) for t in vocab), default=1) + 1


@dataclass
class Loaded:
    """One loaded model and everything derived from it; swapped as a whole on reload."""

    bundle: BundleInfo
    bundle_id: str
    task: object
    backbone: object  # tapper.model.backbone.Backbone
    model: object  # TapPer
    histories: HistoryStore
    generation: str | None  # None: the bundle's own state, no feedback applied yet
    sequence: int  # deltas of `generation` applied
    loaded_at: float
    spool_dir: Path | None = (
        None  # where history stores read from files keep their unread lines (ServeConfig.scratch_dir)
    )
    updates: dict[str, str] = field(default_factory=dict)  # user -> time of their last feedback (ISO, UTC)
    lock: threading.Lock = field(default_factory=threading.Lock)  # guards the per-user state (module doc)
    _bundle_histories: HistoryStore | None = None

    def bundle_histories(self) -> HistoryStore:
        """The bundle's own history store, the base of a "bundle" generation: read when first needed (a server
        that resumes from a snapshot never needs it), then kept."""
        if self._bundle_histories is None:
            self._bundle_histories = read_histories(self.bundle, self.spool_dir)
        return self._bundle_histories

    def live_users(self) -> list[str]:
        """Users with a row (deleted users' tombstones left out)."""
        return [u for u in self.model.user_ids if not is_tombstone(u)]


def merged_lm(model):
    """A copy of `model.plm` (the backbone with the bridge LoRA) for predictions, with the bridge merged into private
    copies of the weights it adapts (q, k, v, o), every other tensor shared.

    Unmerged, each adapted projection runs four more small operations per token (dropout, A, B, scale), which on a
    CPU costs more than its FLOPs: +10 % CPU time for one row, +21 % for eight with SmolLM2 (one thread), against
    +1 % / +14 % merged (the rest is the 8 soft tokens). The bridge never changes while serving (Online-Emb trains
    user rows only), so merging once at load is exact up to float rounding. The feedback trainer keeps the unmerged
    model, so its updates are exactly tapper.online's. Memory: one copy of the adapted projections (about 106 MB
    for SmolLM2, fp32); ServeConfig.merge_bridge=False serves unmerged instead, and so does a bridge scoped to the
    prefix positions (Stage2Config.bridge_scope="prefix"), which returns `model.plm` itself."""
    import copy
    import itertools

    memo: dict[int, object] = {}
    if getattr(model.plm, "scope", None) is not None:
        # bridge_scope="prefix": the bridge acts on the soft tokens' positions only (a PositionScope masks its
        # output per position), which weights merged into the projections cannot do. Served unmerged.
        return model.plm
    for name, tensor in itertools.chain(model.plm.named_parameters(), model.plm.named_buffers()):
        if ".base_layer." not in name:
            memo[id(tensor)] = tensor
    plm = copy.deepcopy(model.plm, memo)
    plm.lm.merge_adapter()
    plm.eval()
    return plm


def bundle_id(info: BundleInfo) -> str:
    key = json.dumps({k: info.meta.get(k) for k in ("version", "backbone_hash", "created_at", "task")}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass
class SnapshotTable:
    """A snapshot's user table and ids, read aside (nothing of the live model touched) to be swapped in."""

    table: nn.Embedding
    user_ids: list[str]


def read_snapshot_table(model, state_dir: Path) -> SnapshotTable:
    """The user table saved in `state_dir` (TapPer.save), as a new Embedding (paged when the live table is), after
    checking that everything else in it (prefix networks, λ's, bridge) equals the live model's: the server only
    ever changes user rows (Online-Emb), so a generation of the same bundle must agree, and one that does not
    needs a full reload (a StateError naming the file)."""
    from tapper.model.paged_table import TABLE_KEY, load_paged_table
    from tapper.model.tapper import CONFIG_FILE, STATE_FILE

    meta = json.loads((state_dir / CONFIG_FILE).read_text())
    if meta["stage2"] != dataclasses.asdict(model.cfg):
        raise StateError(f"{state_dir}: its Stage-2 config differs from the loaded model's; a full reload is needed")
    shared = {f"prefix.{k}": v for k, v in model.prefix.state_dict().items() if k != "user_table.weight"}
    if model.cfg.use_bridge:
        shared.update({f"bridge.{k}": v for k, v in get_peft_model_state_dict(model.plm.lm).items()})
    path = state_dir / STATE_FILE
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        if keys - {TABLE_KEY} != set(shared):
            raise StateError(
                f"{path}: holds tensors {sorted(keys - {TABLE_KEY} ^ set(shared))[:5]} the live model does not"
            )
        for k, v in shared.items():
            if not torch.equal(f.get_tensor(k), v.detach().cpu()):
                raise StateError(
                    f"{path}: {k} differs from the loaded model's (not written by Online-Emb serving); "
                    "a full reload is needed"
                )
        old = model.prefix.user_table
        if getattr(model, "table_dir", None) is not None:
            weight = load_paged_table(path, model.table_dir, old.weight.dtype)
        else:
            weight = f.get_tensor(TABLE_KEY).to(old.weight.dtype)
    table = nn.Embedding(weight.shape[0], weight.shape[1], _weight=weight)
    table.weight.requires_grad_(old.weight.requires_grad)
    return SnapshotTable(table=table, user_ids=list(meta["user_ids"]))


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
