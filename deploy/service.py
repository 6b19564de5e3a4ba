"""The serving model holder: who may touch what, and when.

A bundle (deploy.bundle) is immutable; what feedback changes lives in a state directory (deploy.journal). The
pieces, each in its own module:

    deploy.loaded      the loaded model + per-user state, and `Loaded.lock`, the short lock readers and writers share
    deploy.inference   a batch of predictions (prefixes under the lock, generation without it)
    deploy.batcher     gathers concurrent predictions into batches on one worker thread
    deploy.trainer     Online-Emb updates on a twin of the model, never on what predictions read
    deploy.writer      feedback, deletion, compaction: catch up, compute, write durably, apply
    deploy.replica     loading, adopting generations, replaying journals (replicas sharing a state directory)
    deploy.compaction  compaction in the background, with back-off

Locks, always taken in this order: the writer lock (one feedback, deletion, compaction, sync or reload swap at a
time in this process) -> the state directory's file lock (one writer across replicas) -> `Loaded.lock` (held
for microseconds to milliseconds). Predictions take only the last, so a feedback's training and disk writes,
a compaction, or another replica's snapshot being read never delay them.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from concurrent.futures import Future
from typing import Sequence

from deploy.batcher import Batcher
from deploy.compaction import Compactor
from deploy.config import ServeConfig
from deploy.errors import NotReady
from deploy.inference import PredictJob, Predictor
from deploy.journal import CURRENT_FILE, LiveState
from deploy.loaded import Loaded
from deploy import privacy, replica, writer
from deploy.trainer import RowTrainer
from tapper.atomic import file_lock
from tapper.data.types import Record

log = logging.getLogger("tapper.serve")

__all__ = ["CURRENT_FILE", "ServeConfig", "TapperService"]

# sync_seconds = 0 means "as often as is sensible", not a busy loop.
MIN_SYNC_INTERVAL_S = 0.05


class TapperService:
    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.state = LiveState(cfg.state_dir, spool_dir=cfg.scratch_dir)
        self._writer_lock = threading.RLock()
        self._reload_lock = threading.Lock()
        self._loaded: Loaded | None = None
        self._predictor: Predictor | None = None
        self._trainer: RowTrainer | None = None
        self.started_at = time.time()
        self.ctx = writer.WriteContext(cfg=cfg, state=self.state)
        self.batch_listeners: list = []  # callables(size, queue_waits) (deploy.metrics)
        self.batcher = Batcher(self._run_batch, cfg.batching, on_batch=self._on_batch)
        self.compactor = Compactor(self, cfg.compact_backoff_s, cfg.compact_backoff_max_s)
        self._stop = threading.Event()
        self._syncer: threading.Thread | None = None

    # --- loading -----------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._loaded is not None

    @property
    def loaded(self) -> Loaded:
        if self._loaded is None:
            raise NotReady()
        return self._loaded

    def load(self) -> Loaded:
        """(Re)load the bundle from `model_dir` and the newest generation of it; swap it in when complete.
        Temporary files a crashed writer left in the state directory are removed first."""
        with self._reload_lock:
            with self._writer_lock, file_lock(self.state.lock_path):
                removed = self.state.remove_stale_temporaries()
            if removed:
                log.warning("removed %d temporary file(s) a crashed writer left: %s", len(removed), removed[:5])
            new = replica.build(self.cfg, self.state)
            predictor = Predictor(new, self.cfg.mode, self.cfg.rag_k, self.cfg.max_new_tokens, self.cfg.merge_bridge)
            trainer = (
                RowTrainer(new.model, new.backbone.model, new.backbone.tokenizer, self.cfg.feedback_nice)
                if self.cfg.mode == "tapper"
                else None
            )
            with self._writer_lock:
                old = self._trainer
                self._loaded, self._predictor, self._trainer = new, predictor, trainer
            if old is not None:
                old.close()
            self._start_syncer()
            log.info(
                "loaded bundle %s (version %s, generation %s, %d users)",
                new.bundle.path,
                new.bundle.version,
                new.generation,
                len(new.live_users()),
            )
            return new

    def close(self) -> None:
        """Stop the background threads (batch worker, replica sync, compactor); pending predictions are cancelled."""
        self._stop.set()
        self.batcher.close()
        self.compactor.close()
        if self._trainer is not None:
            self._trainer.close()

    def _start_syncer(self) -> None:
        if self._syncer is None:
            self._syncer = threading.Thread(
                target=_sync_loop,
                args=(weakref.ref(self), self._stop, max(self.cfg.sync_seconds, MIN_SYNC_INTERVAL_S)),
                name="tapper-sync",
                daemon=True,
            )
            self._syncer.start()

    def sync(self) -> bool:
        """Pick up what other replicas wrote (the background thread calls this every sync_seconds)."""
        with self._writer_lock:
            ld = self._loaded
            if ld is None:
                return False
            return replica.sync(ld, self.state)

    # --- predictions -------------------------------------------------------------------------------

    def submit(self, job: PredictJob) -> Future:
        """Queue a prediction for the next batch (QueueFull: a 503 with Retry-After)."""
        self.loaded  # noqa: B018 - NotReady (503) before anything is queued
        return self.batcher.submit(job)

    def predict(
        self,
        user_id: str,
        text: str,
        history: Sequence[Record] | None = None,
        query_date=None,
        query_id: str | None = None,
        max_new_tokens: int | None = None,
        timeout: float | None = 300,
    ) -> dict:
        """One prediction, waiting for its batch (for callers in Python; HTTP handlers use submit)."""
        job = PredictJob(
            user_id=user_id,
            text=text,
            history=list(history or []),
            query_date=query_date,
            query_id=query_id,
            max_new_tokens=max_new_tokens,
        )
        return self.submit(job).result(timeout)

    def _run_batch(self, jobs: Sequence[PredictJob]) -> list:
        predictor = self._predictor
        if predictor is None:
            return [NotReady() for _ in jobs]
        return predictor.run(list(jobs))

    def _on_batch(self, size: int, waits: list[float]) -> None:
        for listener in self.batch_listeners:
            listener(size, waits)

    # --- writes ------------------------------------------------------------------------------------

    def _writing(self):
        return _Writing(self)

    def feedback(self, user_id: str, records: Sequence[Record]) -> dict:
        """Append `records` (with answers) to the user's history and update their row (Online-Emb); persist one
        delta."""
        with self._writing() as ld:
            out = writer.feedback(self.ctx, ld, self._trainer, user_id, records)
            due = ld.sequence >= self.cfg.compact_every
        out["compaction"] = "scheduled" if due else None
        if due:
            self.compactor.request()
        return out

    def delete_user(self, user_id: str) -> dict:
        with self._writing() as ld:
            out = writer.delete_user(self.ctx, ld, user_id)
        self.compactor.request(erase=True)
        out["erasure"] = "scheduled: a snapshot without the user, then older generations removed"
        return out

    def compact(self, force: bool = False, erase: bool = False) -> str | None:
        """Write a snapshot generation now if one is due (or `force`); the compactor thread calls this."""
        with self._writing() as ld:
            return writer.compact(self.ctx, ld, force=force, erase=erase)

    # --- reads -------------------------------------------------------------------------------------

    def user_summary(self, user_id: str) -> dict:
        return privacy.summary(self.loaded, user_id)

    def user_export(self, user_id: str) -> dict:
        return privacy.export(self.loaded, user_id)

    def info(self, admin: bool = False, max_users: int = 1000) -> dict:
        """What is served. User ids and server paths only for `admin` (they identify users and the layout)."""
        ld = self.loaded
        m = ld.model
        with ld.lock:
            users = ld.live_users() if admin else []
            n_users, n_hist = len(ld.live_users()), len(ld.histories)
            generation, sequence = ld.generation, ld.sequence
        out = {
            "task": ld.task.name,
            "model_version": ld.bundle.version,
            "bundle_id": ld.bundle_id,
            "mode": self.cfg.mode,
            "generation": generation,
            "sequence": sequence,
            "compact_every": self.cfg.compact_every,
            "backbone_hash": m.backbone_hash or ld.bundle.backbone_hash,
            "per_user_params": m.per_user_params(),
            "shared_params": m.shared_params(),
            "prefix_len": m.cfg.prefix_len,
            "switches": {
                k: getattr(m.cfg, k)
                for k in ("use_pu", "use_pq", "use_bridge", "use_lambda_t", "use_lambda_o", "bm25_k")
            },
            "n_users": n_users,
            "users_with_history": n_hist,
            "feedback": {
                "mode": "emb",
                "epochs": self.cfg.feedback_epochs,
                "steps": self.cfg.feedback_steps,
                "lr": self.cfg.feedback_lr or m.cfg.lr,
            },
            "batching": {
                "max_batch": self.cfg.batching.max_batch,
                "max_wait_ms": self.cfg.batching.max_wait_ms,
                "max_queue": self.cfg.batching.max_queue,
            },
            "created_at": ld.bundle.meta.get("created_at"),
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ld.loaded_at)),
        }
        if admin:
            out.update(
                {
                    "users": users[:max_users],
                    "users_truncated": len(users) > max_users,
                    "bundle": str(ld.bundle.path),
                    "backbone": str(ld.bundle.stage1_dir),
                    "state_dir": str(self.cfg.state_dir),
                    "scratch_dir": str(self.cfg.scratch_dir) if self.cfg.scratch_dir else None,
                    "source": ld.bundle.meta.get("source", {}),
                    "compaction": {
                        "done": self.compactor.stats.done,
                        "failed": self.compactor.stats.failed,
                        "last_error": self.compactor.stats.last_error,
                    },
                }
            )
        return out


class _Writing:
    """The writer lock and the state directory's file lock, held for one write; yields the Loaded to write to."""

    def __init__(self, svc: TapperService):
        self.svc = svc
        self._lock_cm = None

    def __enter__(self) -> Loaded:
        self.svc._writer_lock.acquire()
        try:
            ld = self.svc.loaded
            self._lock_cm = file_lock(self.svc.state.lock_path)
            self._lock_cm.__enter__()
        except BaseException:
            self.svc._writer_lock.release()
            raise
        return ld

    def __exit__(self, *exc) -> None:
        try:
            self._lock_cm.__exit__(*exc)
        finally:
            self.svc._writer_lock.release()


def _sync_loop(ref, stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        svc = ref()
        if svc is None:
            return
        try:
            svc.sync()
        except FileNotFoundError:
            pass  # a generation pruned while it was read: the next sync adopts the newest
        except Exception as err:  # noqa: BLE001 - logged, retried next time; predictions go on from the state held
            log.error("sync failed: %s", err)
        finally:
            del svc
