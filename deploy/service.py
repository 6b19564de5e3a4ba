"""The serving model holder: predictions, Online-Emb feedback, reloads, and the persisted live state.

A bundle (deploy.bundle) is immutable. What feedback changes (user-table rows, new users, each user's history
store) lives in a *state directory* (layout in deploy.journal): numbered generations, each a base (the bundle's
own state, or a snapshot) plus an append-only journal of per-feedback deltas. A feedback writes one delta with
only the rows and records it changed, so its cost does not grow with the number of users; every
`compact_every` deltas the whole state is written once as a new snapshot generation.

A feedback is applied and written under the in-process lock *and* the file lock: catch up with the newest
state, update the user's row (tapper.online.update_users, mode "emb"), write the delta (temp file, rename).
A crash leaves the journal ending at a complete delta; a failed update or write is undone in memory (the
user's row and any new row are put back exactly). Several replicas (or workers) may share one state directory:
each catches up under the lock before it updates, and predictions pick up other replicas' deltas within
`sync_seconds` by reading only the new delta files (no backbone reload).

A generation belongs to one bundle (`bundle_id`); after a new bundle is deployed, the old generations' user
rows are not applied to it (they were trained against another model), but their history stores are carried
over, so users keep the records they gave.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from deploy.bundle import BundleInfo, read_bundle, read_histories
from deploy.histories import HistoryStore, merge_histories
from deploy.journal import CURRENT_FILE, Delta, LiveState, StateError
from tapper.atomic import file_lock
from tapper.data.types import Example, Record
from tapper.model.embedding_cache import EmbeddingCache

log = logging.getLogger("tapper.serve")

__all__ = ["CURRENT_FILE", "FeedbackConflict", "ServeConfig", "TapperService"]


class FeedbackConflict(ValueError):
    """Feedback that contradicts the user's stored history (duplicate id, a date before the latest record)."""

    def __init__(self, loc: tuple, msg: str):
        super().__init__(msg)
        self.loc = loc
        self.msg = msg


@dataclass
class ServeConfig:
    model_dir: Path
    # Where feedback state lives (default: <model_dir>/live). Must be writable; shared by replicas if RWX.
    state_dir: Path | None = None
    # Online-Emb budget per feedback request: `feedback_steps` optimizer steps if set, else epochs over its examples.
    feedback_epochs: float = 1.0
    feedback_steps: int | None = None
    feedback_lr: float | None = None  # default: the model's Stage-2 lr
    max_new_tokens: int | None = None  # default: per task kind
    # Check that stage1/ hashes to the backbone the TapPer state was trained on (one pass over the weights).
    verify_backbone: bool = True
    keep_generations: int = 3
    sync_seconds: float = 2.0
    # Write the whole state as a new snapshot generation after this many feedback deltas (bounds replay at load).
    compact_every: int = 1000
    # Opt-in: keep per-user state in unlinked scratch files here instead of anonymous memory: the user table in a
    # shared mapping (page cache, evictable, only rows in use resident; tapper.model.paged_table) and the history
    # stores' unread lines in spool files (deploy.histories). Must be on a local disk (tapper.scratch), never the
    # shared state volume; each replica its own. Created if missing. None: both in memory.
    scratch_dir: Path | None = None

    def __post_init__(self) -> None:
        self.model_dir = Path(self.model_dir)
        self.state_dir = Path(self.state_dir) if self.state_dir else self.model_dir / "live"
        self.scratch_dir = Path(self.scratch_dir) if self.scratch_dir else None
        if self.feedback_steps is not None and self.feedback_steps <= 0:
            raise ValueError("feedback_steps must be > 0")
        if self.feedback_epochs <= 0:
            raise ValueError("feedback_epochs must be > 0")
        if self.compact_every < 1:
            raise ValueError("compact_every must be >= 1")
        if self.keep_generations < 2:
            # The previous generation stays while replicas that were reading it catch up.
            raise ValueError("keep_generations must be >= 2")

    @classmethod
    def from_env(cls, **overrides) -> "ServeConfig":
        env = os.environ
        model_dir = overrides.pop("model_dir", None) or env.get("TAPPER_MODEL_DIR")
        if not model_dir:
            raise ValueError("no model bundle: set TAPPER_MODEL_DIR or pass --model-dir")
        kw = dict(
            state_dir=env.get("TAPPER_STATE_DIR") or None,
            feedback_epochs=float(env.get("TAPPER_FEEDBACK_EPOCHS", 1.0)),
            feedback_steps=int(env["TAPPER_FEEDBACK_STEPS"]) if env.get("TAPPER_FEEDBACK_STEPS") else None,
            feedback_lr=float(env["TAPPER_FEEDBACK_LR"]) if env.get("TAPPER_FEEDBACK_LR") else None,
            max_new_tokens=int(env["TAPPER_MAX_NEW_TOKENS"]) if env.get("TAPPER_MAX_NEW_TOKENS") else None,
            verify_backbone=env.get("TAPPER_VERIFY_BACKBONE", "1").lower() not in ("0", "false", "no"),
            keep_generations=int(env.get("TAPPER_KEEP_GENERATIONS", 3)),
            sync_seconds=float(env.get("TAPPER_SYNC_SECONDS", 2.0)),
            compact_every=int(env.get("TAPPER_COMPACT_EVERY", 1000)),
            scratch_dir=env.get("TAPPER_SCRATCH_DIR") or None,
        )
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(model_dir=Path(model_dir), **kw)


class ServingVectors(EmbeddingCache):
    """Record/query vectors computed on the fly, never written to disk.

    A vector is a mean of frozen input-embedding rows (no forward pass), so computing it per request costs
    microseconds, while the on-disk EmbeddingCache writes a shard for every new text it sees (every
    query is new text, and nothing would ever read those vectors again). Same `_mean_embed` as training,
    so the vectors are the ones the model was trained on.
    """

    def __init__(self, model: nn.Module, tokenizer, max_tokens: int = 512):
        with tempfile.TemporaryDirectory(prefix="tapper-vectors-") as tmp:
            super().__init__(tmp, model, tokenizer, max_tokens)
        self.dir = None

    def encode(self, texts: list[str], batch_size: int = 256, progress: bool = True) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.dim)
        self.stats.computed += len(texts)
        return torch.cat([self._mean_embed(texts[i: i + batch_size]) for i in range(0, len(texts), batch_size)])


@dataclass
class Loaded:
    """One loaded model and everything derived from it; swapped as a whole on reload."""

    bundle: BundleInfo
    bundle_id: str
    task: object
    backbone: object  # tapper.model.backbone.Backbone
    model: object  # TapPer
    vectors: ServingVectors
    histories: HistoryStore
    generation: str | None  # None: the bundle's own state, no feedback applied yet
    sequence: int  # deltas of `generation` applied
    loaded_at: float
    spool_dir: Path | None = None  # where history stores read from files keep their unread lines (ServeConfig.scratch_dir)
    _bundle_histories: HistoryStore | None = None

    def bundle_histories(self) -> HistoryStore:
        """The bundle's own history store, the base of a "bundle" generation: read when first needed (a server
        that resumes from a snapshot never needs it), then kept."""
        if self._bundle_histories is None:
            self._bundle_histories = read_histories(self.bundle, self.spool_dir)
        return self._bundle_histories


def bundle_id(info: BundleInfo) -> str:
    key = json.dumps({k: info.meta.get(k) for k in ("version", "backbone_hash", "created_at", "task")}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def load_state_into(model, state_dir: Path) -> None:
    """Replace a loaded TapPer's trained tensors and user ids with those saved in `state_dir` (no backbone reload).

    The Stage-2 configuration must be the one the model was built with (a generation of the same bundle).
    A paged table (`model.table_dir` set) is replaced by a new paged one filled from the file in chunks.
    """
    from tapper.model.paged_table import load_prefix_paged
    from tapper.model.tapper import CONFIG_FILE, STATE_FILE

    meta = json.loads((state_dir / CONFIG_FILE).read_text())
    if meta["stage2"] != dataclasses.asdict(model.cfg):
        raise ValueError(f"{state_dir}: its Stage-2 config differs from the loaded model's; a full reload is needed")
    if getattr(model, "table_dir", None) is not None:
        tensors = load_prefix_paged(model, state_dir / STATE_FILE, model.table_dir)
    else:
        tensors = load_file(state_dir / STATE_FILE)
        prefix_sd = {k[len("prefix."):]: v for k, v in tensors.items() if k.startswith("prefix.")}
        rows, width = prefix_sd["user_table.weight"].shape
        old = model.prefix.user_table
        if old.num_embeddings != rows:
            # _weight: no random init of rows that load_state_dict overwrites next.
            grown = nn.Embedding(rows, width, _weight=torch.empty(rows, width, dtype=old.weight.dtype, device=old.weight.device))
            grown.weight.requires_grad_(old.weight.requires_grad)
            model.prefix.user_table = grown
        model.prefix.load_state_dict(prefix_sd)
    if model.cfg.use_bridge:
        set_peft_model_state_dict(model.plm.lm, {k[len("bridge."):]: v for k, v in tensors.items() if k.startswith("bridge.")})
    model.user_ids = list(meta["user_ids"])
    model.user_rows = {u: i + 1 for i, u in enumerate(model.user_ids)}
    model.eval()


class TapperService:
    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self._lock = threading.RLock()
        self._reload_lock = threading.Lock()
        self._loaded: Loaded | None = None
        self._last_sync = 0.0
        self.started_at = time.time()

    # --- loading -----------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._loaded is not None

    @property
    def loaded(self) -> Loaded:
        if self._loaded is None:
            raise RuntimeError("no model loaded")
        return self._loaded

    def load(self) -> Loaded:
        """(Re)load the bundle from `model_dir` and the newest generation of it; swap it in when complete."""
        with self._reload_lock:
            new = self._build()
            with self._lock:
                self._loaded = new
                self._last_sync = time.monotonic()
            log.info("loaded bundle %s (version %s, generation %s, %d users)", new.bundle.path, new.bundle.version,
                     new.generation, len(new.model.user_ids))
            return new

    @property
    def state(self) -> LiveState:
        return LiveState(self.cfg.state_dir, spool_dir=self.cfg.scratch_dir)

    def _build(self) -> Loaded:
        from tapper.model.backbone import load_backbone_dir, weights_hash
        from tapper.model.tapper import TapPer

        info = read_bundle(self.cfg.model_dir)
        bid = bundle_id(info)
        bb = load_backbone_dir(info.stage1_dir)
        state_meta = json.loads((info.state_dir / "tapper_config.json").read_text())
        expected = state_meta.get("backbone_hash") or info.backbone_hash
        if self.cfg.verify_backbone and expected:
            got = weights_hash(bb.model)
            if got != expected:
                raise ValueError(f"{info.stage1_dir}: weights hash {got[:16]}… is not the backbone the TapPer state "
                                 f"was trained on ({expected[:16]}…); the bundle is inconsistent")
        # scratch_dir: the user table is paged there from the start (filled from the file in chunks, never a full
        # copy in memory), and history files read below are spooled there.
        model = TapPer.load(info.state_dir, bb.model, table_dir=self.cfg.scratch_dir)
        ld = Loaded(bundle=info, bundle_id=bid, task=info.task_spec(), backbone=bb, model=model,
                    vectors=ServingVectors(bb.model, bb.tokenizer), histories=HistoryStore(),
                    generation=None, sequence=0, loaded_at=time.time(), spool_dir=self.cfg.scratch_dir)
        cur = self.state.current()
        if cur and cur.get("bundle_id") == bid:
            self._adopt(ld, cur["generation"], fresh=True)
            return ld
        ld.histories = ld.bundle_histories().copy()
        if cur:
            # A generation of another bundle: keep the users' records, not the rows trained for another model.
            with contextlib.suppress(FileNotFoundError):
                ld.histories = merge_histories(ld.histories, self.state.histories(cur["generation"]))
        return ld

    def _adopt(self, ld: Loaded, name: str, fresh: bool = False) -> None:
        """Make `ld` the state of generation `name`: its base, then every delta of its journal.

        `fresh`: ld.model is the bundle's state as loaded (no reset needed). If this fails half way, `ld` is
        marked as in no generation, so the next sync adopts the newest one from its base again."""
        meta = self.state.meta(name)
        if meta.get("bundle_id") != ld.bundle_id:
            raise StateError(f"{self.state.gen_dir(name)}: belongs to bundle {meta.get('bundle_id')}, not {ld.bundle_id}")
        ld.generation, ld.sequence = "", -1  # "in no generation" until done
        if meta["base"] == "snapshot":
            load_state_into(ld.model, self.state.snapshot_state_dir(name))
            histories = self.state.snapshot_histories(name)
        else:
            if not fresh:
                load_state_into(ld.model, ld.bundle.state_dir)
            histories = ld.bundle_histories().copy()
        ld.histories, ld.generation, ld.sequence = histories, name, 0
        self._catch_up(ld)

    def _catch_up(self, ld: Loaded) -> None:
        """Apply the deltas of ld.generation's journal that ld has not seen, one at a time (ld stays consistent)."""
        from tapper.online.update import add_users

        model = ld.model
        for delta in self.state.deltas_after(ld.generation, ld.sequence):
            clash = [u for u in delta.new_users if u in model.user_rows]
            missing = [u for u in delta.users if u not in model.user_rows and u not in delta.new_users]
            if clash or missing:
                raise StateError(f"{self.state.delta_path(ld.generation, delta.sequence)}: users {clash or missing} do not fit the table this delta extends")
            add_users(model, delta.new_users)
            if delta.users:
                table = model.prefix.user_table.weight
                with torch.no_grad():
                    table[[model.user_rows[u] for u in delta.users]] = delta.rows.to(table.dtype).to(table.device)
            for user, recs in delta.records.items():
                ld.histories[user] = list(ld.histories.get(user, [])) + recs
            ld.sequence = delta.sequence

    def _sync_locked(self, force: bool = False) -> None:
        """Catch up with the newest state of this bundle written by other processes (caller holds self._lock).

        `force` (a feedback, under the file lock): always, and errors propagate, since an update must start
        from the newest state. Otherwise at most every `sync_seconds`, and a generation pruned while it was
        read is left for the next sync."""
        now = time.monotonic()
        if not force and now - self._last_sync < self.cfg.sync_seconds:
            return
        self._last_sync = now
        ld = self.loaded
        try:
            cur = self.state.current()
            if not cur or cur.get("bundle_id") != ld.bundle_id:
                return
            if cur["generation"] == ld.generation:
                self._catch_up(ld)
            else:
                self._adopt(ld, cur["generation"])
                log.info("synced to %s (+%d deltas)", ld.generation, ld.sequence)
        except Exception as err:
            if force:
                raise
            # Routine when a generation was pruned while read; anything else is logged and retried next sync,
            # while predictions go on from the state this replica has.
            log.log(logging.DEBUG if isinstance(err, FileNotFoundError) else logging.ERROR, "sync failed: %s", err)

    # --- predict -----------------------------------------------------------------------------------

    def predict(self, user_id: str, text: str, history: Sequence[Record] | None = None, query_date=None,
                query_id: str | None = None, max_new_tokens: int | None = None) -> dict:
        from tapper.eval.predict import generate_texts
        from tapper.train.stage2 import encoder_for

        with self._lock:
            self._sync_locked()
            ld = self.loaded
            stored = ld.histories.get(user_id, [])
            used = merge_histories({user_id: stored}, {user_id: list(history or [])}).get(user_id, [])
            qid = query_id or uuid.uuid4().hex
            ex = Example(id=qid, user_id=user_id, input=text, target=None, history=used, query_date=query_date)
            model = ld.model
            encoded = encoder_for(model, ld.task, ld.backbone.tokenizer, ld.vectors).encode([ex], model.user_rows, progress=False,
                                                                                        unknown_users="pq_only")
            pred = generate_texts(model, encoded, ld.backbone.tokenizer, ld.task, batch_size=1,
                                  max_new_tokens=max_new_tokens or self.cfg.max_new_tokens, progress=False)[qid]
            row = model.user_rows.get(user_id, 0) if model.cfg.use_pu else 0
            return {"id": qid, "user_id": user_id, "prediction": pred, "known_user": user_id in model.user_rows,
                    "user_row": row, "history_used": len(encoded.items[0].hist_rows), "history_stored": len(stored),
                    "model_version": ld.bundle.version, "generation": ld.generation, "sequence": ld.sequence}

    # --- feedback ----------------------------------------------------------------------------------

    def feedback(self, user_id: str, records: Sequence[Record]) -> dict:
        """Append `records` (with answers) to the user's history and update their row (Online-Emb); persist one delta."""
        from tapper.online.update import feedback_examples, update_users

        with self._lock, file_lock(self.state.lock_path):
            self._sync_locked(force=True)
            ld = self.loaded
            history = ld.histories.get(user_id, [])
            self._check_new_records(history, records)
            examples = feedback_examples(ld.task, user_id, history, records)
            model = ld.model
            report = None
            skipped = None
            undo = _RowUndo(model, user_id)
            try:
                if ld.generation is None:
                    self._start_generation(ld)
                if not model.cfg.use_pu:
                    skipped = "this model has no per-user rows (use_pu=false): the records only extend the history P_q reads"
                elif not examples:
                    skipped = f"{ld.task.name} records make no training example: the records only extend the history"
                else:
                    seed = int(ld.generation.split("-")[1]) * 1_000_000 + ld.sequence + 1
                    report = update_users(model, ld.task, ld.backbone.tokenizer, ld.vectors, examples, "emb",
                                          epochs=self.cfg.feedback_epochs, steps=self.cfg.feedback_steps,
                                          lr=self.cfg.feedback_lr, seed=seed)
                users = report.users if report else []
                table = model.prefix.user_table.weight
                rows = table.detach()[[model.user_rows[u] for u in users]].clone()
                delta = Delta(sequence=ld.sequence + 1, users=users, rows=rows, new_users=report.new_users if report else [],
                              records={user_id: list(records)}, report=report.to_dict() if report else None)
                self.state.write_delta(ld.generation, delta)
            except BaseException:
                self._undo(undo)
                raise
            ld.histories[user_id] = list(history) + list(records)
            ld.sequence = delta.sequence
            written = (ld.generation, ld.sequence)
            compacted = self._maybe_compact(ld)
            return {"user_id": user_id, "accepted": len(records), "history_stored": len(ld.histories[user_id]),
                    "updated": report is not None, "skipped": skipped, "generation": written[0], "sequence": written[1],
                    "compacted_into": compacted,
                    "user_row": model.user_rows.get(user_id, 0) if model.cfg.use_pu else 0,
                    "report": report.to_dict() if report else None}

    def _start_generation(self, ld: Loaded) -> None:
        """The first feedback for this bundle: a generation on the bundle's own state, or, when another bundle's
        state is there (whose histories `ld` carried over), a snapshot so those histories are kept."""
        fresh = self.state.current() is None
        ld.generation = self.state.start_generation(
            bundle_id=ld.bundle_id, bundle_version=ld.bundle.version, bundle_path=ld.bundle.path, parent=None,
            parent_sequence=0, model=None if fresh else ld.model, histories=None if fresh else ld.histories)
        ld.sequence = 0

    def _maybe_compact(self, ld: Loaded) -> str | None:
        """Past `compact_every` deltas, write the whole state as a new snapshot generation (the delta is already
        safe in the journal, so a failure here only leaves the journal longer; the next feedback retries)."""
        if ld.sequence < self.cfg.compact_every:
            return None
        try:
            name = self.state.start_generation(
                bundle_id=ld.bundle_id, bundle_version=ld.bundle.version, bundle_path=ld.bundle.path,
                parent=ld.generation, parent_sequence=ld.sequence, model=ld.model, histories=ld.histories)
        except Exception:
            log.exception("compaction of %s failed; its journal keeps growing until a later feedback compacts it", ld.generation)
            return None
        ld.generation, ld.sequence = name, 0
        self.state.prune(self.cfg.keep_generations, current=name)
        return name

    def _undo(self, undo: "_RowUndo") -> None:
        try:
            undo.restore()
        except Exception:  # the model is in an unknown state: refuse to serve it until a reload
            log.exception("undoing a failed feedback failed; unloading the model")
            self._loaded = None

    @staticmethod
    def _check_new_records(history: Sequence[Record], records: Sequence[Record]) -> None:
        ids = {r.id for r in history}
        latest = max((r.date for r in history if r.date is not None), default=None)
        for i, r in enumerate(records):
            if r.id in ids:
                raise FeedbackConflict(("body", "records", i, "id"), f"record id {r.id!r} is already in this user's history")
            ids.add(r.id)
            if r.date is not None:
                if latest is not None and r.date < latest:
                    raise FeedbackConflict(("body", "records", i, "date"),
                                           f"date {r.date.isoformat()} is before the user's latest record ({latest.isoformat()}); "
                                           "feedback must arrive in time order")
                latest = r.date

    # --- info --------------------------------------------------------------------------------------

    def info(self, max_users: int = 1000) -> dict:
        with self._lock:
            self._sync_locked()
            ld = self.loaded
            m = ld.model
            users = list(m.user_ids)
            return {
                "task": ld.task.name, "model_version": ld.bundle.version, "bundle": str(ld.bundle.path),
                "bundle_id": ld.bundle_id, "generation": ld.generation, "sequence": ld.sequence,
                "compact_every": self.cfg.compact_every, "backbone_hash": m.backbone_hash or ld.bundle.backbone_hash,
                "backbone": str(ld.bundle.stage1_dir), "per_user_params": m.per_user_params(), "shared_params": m.shared_params(),
                "prefix_len": m.cfg.prefix_len, "switches": {k: getattr(m.cfg, k) for k in
                                                             ("use_pu", "use_pq", "use_bridge", "use_lambda_t", "use_lambda_o", "bm25_k")},
                "n_users": len(users), "users": users[:max_users], "users_truncated": len(users) > max_users,
                "users_with_history": len(ld.histories), "state_dir": str(self.cfg.state_dir),
                "scratch_dir": str(self.cfg.scratch_dir) if self.cfg.scratch_dir else None,
                "feedback": {"mode": "emb", "epochs": self.cfg.feedback_epochs, "steps": self.cfg.feedback_steps,
                             "lr": self.cfg.feedback_lr or m.cfg.lr},
                "source": ld.bundle.meta.get("source", {}), "created_at": ld.bundle.meta.get("created_at"),
                "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ld.loaded_at)),
            }


class _RowUndo:
    """What an Online-Emb feedback can change (the user's row, new rows, the id list), saved to put back exactly."""

    def __init__(self, model, user_id: str):
        self.model = model
        self.rows_in_use = model.rows_in_use
        self.user_ids = list(model.user_ids)
        row = model.user_rows.get(user_id)
        self.rows = {row: model.prefix.user_table.weight.detach()[row].clone()} if row is not None else {}

    def restore(self) -> None:
        model = self.model
        added = model.rows_in_use
        with torch.no_grad():
            # Rows a new user took go back to spare (zero); a table reallocated meanwhile keeps its room.
            model.prefix.user_table.weight[self.rows_in_use: added] = 0
            for row, value in self.rows.items():
                model.prefix.user_table.weight[row] = value
        model.user_ids = list(self.user_ids)
        model.user_rows = {u: i + 1 for i, u in enumerate(model.user_ids)}
