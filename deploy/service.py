"""The serving model holder: predictions, Online-Emb feedback, reloads, and the persisted live state.

A bundle (deploy.bundle) is immutable. What feedback changes (user-table rows, new users, each user's history
store) lives in a *state directory* as numbered generations::

    <state_dir>/
      CURRENT              {"generation": "gen-000003", "bundle_id": "...", "updated_at": ...}
      gen-000003/
        tapper/            TapPer.save() of the updated model (user table grown/updated; all else as trained)
        histories.json     every user's history store {user_id: [LaMP profile items]}
        meta.json          {generation, bundle_id, parent, users (updated), update report}
      .lock                cross-process lock (fcntl.flock) held while a feedback is applied and written

A feedback is applied and written under the in-process lock *and* the file lock: sync to the newest
generation, update the rows (tapper.online.update_users, mode "emb"), write the new generation into a
temporary directory, rename it into place, then replace CURRENT (write-temp-then-rename). A crash leaves
CURRENT pointing at a complete generation; a failed update is rolled back by reloading the last generation.
Several replicas (or workers) may share one state directory: each re-reads the newest generation before it
updates, and predictions pick up other replicas' generations within `sync_seconds` (no backbone reload:
only the TapPer tensors are re-read).

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
import re
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from deploy.bundle import BundleInfo, histories_from_json, histories_to_json, read_bundle, read_histories
from tapper.atomic import atomic_write_json, file_lock
from tapper.data.chronology import sort_chronologically
from tapper.data.types import Example, Record
from tapper.model.embedding_cache import EmbeddingCache

log = logging.getLogger("tapper.serve")

CURRENT_FILE = "CURRENT"
LOCK_FILE = ".lock"
GEN_RE = re.compile(r"^gen-(\d{6,})$")


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

    def __post_init__(self) -> None:
        self.model_dir = Path(self.model_dir)
        self.state_dir = Path(self.state_dir) if self.state_dir else self.model_dir / "live"
        if self.feedback_steps is not None and self.feedback_steps <= 0:
            raise ValueError("feedback_steps must be > 0")
        if self.feedback_epochs <= 0:
            raise ValueError("feedback_epochs must be > 0")

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
    histories: dict[str, list[Record]]
    generation: str | None  # None: the bundle's own state, no feedback applied yet
    loaded_at: float


def bundle_id(info: BundleInfo) -> str:
    key = json.dumps({k: info.meta.get(k) for k in ("version", "backbone_hash", "created_at", "task")}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def merge_histories(*stores: Mapping[str, Sequence[Record]]) -> dict[str, list[Record]]:
    """Union per user by record id (later stores win), chronological."""
    out: dict[str, dict[str, Record]] = {}
    for store in stores:
        for user, recs in store.items():
            d = out.setdefault(user, {})
            for r in recs:
                d[r.id] = r
    return {u: sort_chronologically(list(d.values())) for u, d in out.items()}


def load_state_into(model, state_dir: Path) -> None:
    """Replace a loaded TapPer's trained tensors and user ids with those saved in `state_dir` (no backbone reload).

    The Stage-2 configuration must be the one the model was built with (a generation of the same bundle).
    """
    from tapper.model.tapper import CONFIG_FILE, STATE_FILE

    meta = json.loads((state_dir / CONFIG_FILE).read_text())
    if meta["stage2"] != dataclasses.asdict(model.cfg):
        raise ValueError(f"{state_dir}: its Stage-2 config differs from the loaded model's; a full reload is needed")
    tensors = load_file(state_dir / STATE_FILE)
    prefix_sd = {k[len("prefix."):]: v for k, v in tensors.items() if k.startswith("prefix.")}
    rows, width = prefix_sd["user_table.weight"].shape
    old = model.prefix.user_table
    if old.num_embeddings != rows:
        grown = nn.Embedding(rows, width, dtype=old.weight.dtype, device=old.weight.device)
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
        model = TapPer.load(info.state_dir, bb.model)
        histories = read_histories(info)
        generation = None
        cur = self._read_current()
        if cur and cur.get("bundle_id") == bid:
            gen_dir = self.cfg.state_dir / cur["generation"]
            load_state_into(model, gen_dir / "tapper")
            histories = self._read_gen_histories(gen_dir)
            generation = cur["generation"]
        elif cur:
            # A generation of another bundle: keep the users' records, not the rows trained for another model.
            with contextlib.suppress(FileNotFoundError):
                histories = merge_histories(histories, self._read_gen_histories(self.cfg.state_dir / cur["generation"]))
        return Loaded(bundle=info, bundle_id=bid, task=info.task_spec(), backbone=bb, model=model,
                      vectors=ServingVectors(bb.model, bb.tokenizer), histories=histories, generation=generation,
                      loaded_at=time.time())

    def _read_current(self) -> dict | None:
        path = self.cfg.state_dir / CURRENT_FILE
        try:
            cur = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        if not GEN_RE.match(str(cur.get("generation", ""))):
            raise ValueError(f"{path}: field 'generation' is not a generation name: {cur.get('generation')!r}")
        return cur

    @staticmethod
    def _read_gen_histories(gen_dir: Path) -> dict[str, list[Record]]:
        path = gen_dir / "histories.json"
        return histories_from_json(json.loads(path.read_text()), str(path))

    def _sync_locked(self, force: bool = False) -> None:
        """Adopt a newer generation of this bundle written by another process (caller holds self._lock)."""
        now = time.monotonic()
        if not force and now - self._last_sync < self.cfg.sync_seconds:
            return
        self._last_sync = now
        cur = self._read_current()
        ld = self.loaded
        if not cur or cur.get("bundle_id") != ld.bundle_id or cur["generation"] == ld.generation:
            return
        gen_dir = self.cfg.state_dir / cur["generation"]
        try:
            histories = self._read_gen_histories(gen_dir)
            load_state_into(ld.model, gen_dir / "tapper")
        except FileNotFoundError:  # pruned while we looked; the next sync sees the newer one
            return
        ld.histories = histories
        ld.generation = cur["generation"]
        log.info("synced to %s", ld.generation)

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
            encoded = encoder_for(model, ld.task, ld.backbone.tokenizer, ld.vectors).encode([ex], model.user_rows, progress=False)
            pred = generate_texts(model, encoded, ld.backbone.tokenizer, ld.task, batch_size=1,
                                  max_new_tokens=max_new_tokens or self.cfg.max_new_tokens, progress=False)[qid]
            row = model.user_rows.get(user_id, 0) if model.cfg.use_pu else 0
            return {"id": qid, "user_id": user_id, "prediction": pred, "known_user": user_id in model.user_rows,
                    "user_row": row, "history_used": len(encoded.items[0].hist_rows), "history_stored": len(stored),
                    "model_version": ld.bundle.version, "generation": ld.generation}

    # --- feedback ----------------------------------------------------------------------------------

    def feedback(self, user_id: str, records: Sequence[Record]) -> dict:
        """Append `records` (with answers) to the user's history and update their row (Online-Emb); persist."""
        from tapper.online.update import feedback_examples, update_users

        with self._lock, file_lock(self.cfg.state_dir / LOCK_FILE):
            self._sync_locked(force=True)
            ld = self.loaded
            history = ld.histories.get(user_id, [])
            self._check_new_records(history, records)
            examples = feedback_examples(ld.task, user_id, history, records)
            model = ld.model
            report = None
            skipped = None
            try:
                if not model.cfg.use_pu:
                    skipped = "this model has no per-user rows (use_pu=false): the records only extend the history P_q reads"
                elif not examples:
                    skipped = f"{ld.task.name} records make no training example: the records only extend the history"
                else:
                    seed = self._next_generation_number()
                    report = update_users(model, ld.task, ld.backbone.tokenizer, ld.vectors, examples, "emb",
                                          epochs=self.cfg.feedback_epochs, steps=self.cfg.feedback_steps,
                                          lr=self.cfg.feedback_lr, seed=seed)
                histories = dict(ld.histories)
                histories[user_id] = list(history) + list(records)
                gen = self._write_generation(ld, histories, user_id, report)
            except BaseException:
                self._rollback(ld)
                raise
            ld.histories = histories
            ld.generation = gen
            return {"user_id": user_id, "accepted": len(records), "history_stored": len(histories[user_id]),
                    "updated": report is not None, "skipped": skipped, "generation": gen,
                    "user_row": model.user_rows.get(user_id, 0) if model.cfg.use_pu else 0,
                    "report": report.to_dict() if report else None}

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

    def _gen_numbers(self) -> list[int]:
        if not self.cfg.state_dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.cfg.state_dir.iterdir() if (m := GEN_RE.match(p.name)))

    def _next_generation_number(self) -> int:
        nums = self._gen_numbers()
        return (nums[-1] + 1) if nums else 1

    def _write_generation(self, ld: Loaded, histories: dict, user_id: str, report) -> str:
        state = self.cfg.state_dir
        state.mkdir(parents=True, exist_ok=True)
        name = f"gen-{self._next_generation_number():06d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=state))
        try:
            ld.model.save(tmp / "tapper")
            atomic_write_json(tmp / "histories.json", histories_to_json(histories))
            atomic_write_json(tmp / "meta.json", {
                "generation": name, "bundle_id": ld.bundle_id, "bundle_version": ld.bundle.version, "parent": ld.generation,
                "users": [user_id], "report": report.to_dict() if report else None,
                "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            })
            os.chmod(tmp, 0o755)
            os.replace(tmp, state / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_json(state / CURRENT_FILE, {"generation": name, "bundle_id": ld.bundle_id,
                                                 "bundle_version": ld.bundle.version,
                                                 "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        self._prune(keep=name)
        return name

    def _prune(self, keep: str) -> None:
        nums = self._gen_numbers()
        for n in nums[: max(0, len(nums) - self.cfg.keep_generations)]:
            name = f"gen-{n:06d}"
            if name != keep:
                shutil.rmtree(self.cfg.state_dir / name, ignore_errors=True)

    def _rollback(self, ld: Loaded) -> None:
        """Put the in-memory model back to the last persisted state after a failed update."""
        src = self.cfg.state_dir / ld.generation / "tapper" if ld.generation else ld.bundle.state_dir
        try:
            load_state_into(ld.model, src)
        except Exception:  # the model is in an unknown state: refuse to serve it until a reload
            log.exception("rollback from %s failed; unloading the model", src)
            self._loaded = None

    # --- info --------------------------------------------------------------------------------------

    def info(self, max_users: int = 1000) -> dict:
        with self._lock:
            self._sync_locked()
            ld = self.loaded
            m = ld.model
            users = list(m.user_ids)
            return {
                "task": ld.task.name, "model_version": ld.bundle.version, "bundle": str(ld.bundle.path),
                "bundle_id": ld.bundle_id, "generation": ld.generation, "backbone_hash": m.backbone_hash or ld.bundle.backbone_hash,
                "backbone": str(ld.bundle.stage1_dir), "per_user_params": m.per_user_params(), "shared_params": m.shared_params(),
                "prefix_len": m.cfg.prefix_len, "switches": {k: getattr(m.cfg, k) for k in
                                                             ("use_pu", "use_pq", "use_bridge", "use_lambda_t", "use_lambda_o", "bm25_k")},
                "n_users": len(users), "users": users[:max_users], "users_truncated": len(users) > max_users,
                "users_with_history": len(ld.histories), "state_dir": str(self.cfg.state_dir),
                "feedback": {"mode": "emb", "epochs": self.cfg.feedback_epochs, "steps": self.cfg.feedback_steps,
                             "lr": self.cfg.feedback_lr or m.cfg.lr},
                "source": ld.bundle.meta.get("source", {}), "created_at": ld.bundle.meta.get("created_at"),
                "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ld.loaded_at)),
            }
