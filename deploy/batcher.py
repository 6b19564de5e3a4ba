"""Micro-batching: concurrent predictions gathered into one forward pass, on one worker thread.

    submit(job) -> concurrent.futures.Future        (QueueFull when `max_queue` jobs already wait: a 503)

The worker takes the oldest job, then gathers more for at most `max_wait_ms` (a batch that fills up goes at
once) up to `max_batch`, drops the jobs whose future was cancelled meanwhile (the HTTP handler cancels when its
client disconnects, so no work is done for clients that have gone), and runs the rest as one batch. Under load
the next batch is already waiting when one finishes, so the wait is paid only when the server is nearly idle.

One worker: the model's forward pass already uses every core torch is given, and a second concurrent pass would
only compete with it. The worker is also the only thread that tokenizes for predictions (HF fast tokenizers
are not safe to share between threads).

The loop holds only a weak reference to its Batcher, so a Batcher nobody uses any more is collected and its
thread ends; `close()` ends it at once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from deploy.config import Batching
from deploy.errors import QueueFull

log = logging.getLogger("tapper.serve")


@dataclass
class Job:
    payload: Any
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)


@dataclass
class BatchStats:
    """What the worker did; read by the metrics (plain counters, written by the worker thread only)."""

    batches: int = 0
    rows: int = 0
    dropped: int = 0  # cancelled (client gone) before their batch ran
    running: int = 0  # rows of the batch running now (0 when idle)
    last_sizes: list[int] = field(default_factory=list)  # recent batch sizes, for tests and metrics (bounded)


class Batcher:
    def __init__(
        self,
        run_batch: Callable[[Sequence[Any]], Sequence[Any]],
        cfg: Batching,
        on_batch: Callable[[int, list[float]], None] | None = None,
        name: str = "tapper-batcher",
    ):
        """`run_batch(payloads)` returns one result per payload, each a value or an exception instance (that job
        fails alone). `on_batch(size, queue_waits)` is told about every batch (metrics)."""
        self.cfg = cfg
        self.run_batch = run_batch
        self.on_batch = on_batch
        self.stats = BatchStats()
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=cfg.max_queue)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_worker, args=(weakref.ref(self), self._queue, self._stop), name=name, daemon=True
        )
        self._thread.start()

    def submit(self, payload: Any) -> Future:
        job = Job(payload)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(self.cfg.retry_after_s) from None
        return job.future

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _gather(self, first: Job) -> list[Job]:
        batch = [first]
        deadline = time.monotonic() + self.cfg.max_wait_ms / 1000
        while len(batch) < self.cfg.max_batch:
            remaining = deadline - time.monotonic()
            try:
                batch.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _run(self, batch: list[Job]) -> None:
        # A cancelled future refuses to run: its client has gone, nobody reads the answer.
        live = [j for j in batch if j.future.set_running_or_notify_cancel()]
        self.stats.dropped += len(batch) - len(live)
        if not live:
            return
        started = time.monotonic()
        self.stats.running = len(live)
        try:
            results = list(self.run_batch([j.payload for j in live]))
            if len(results) != len(live):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(live)} jobs")
        except BaseException as err:  # noqa: BLE001 - every job of the batch gets the error, the worker goes on
            log.exception("a prediction batch failed")
            results = [err] * len(live)
        finally:
            self.stats.running = 0
        for job, result in zip(live, results):
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)
        self.stats.batches += 1
        self.stats.rows += len(live)
        self.stats.last_sizes = (self.stats.last_sizes + [len(live)])[-1000:]
        if self.on_batch is not None:
            self.on_batch(len(live), [started - j.enqueued for j in live])


def _worker(ref: "weakref.ref[Batcher]", jobs: "queue.Queue[Job]", stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            first = jobs.get(timeout=0.5)
        except queue.Empty:
            if ref() is None:
                return
            continue
        batcher = ref()
        if batcher is None:
            first.future.cancel()
            return
        batcher._run(batcher._gather(first))
        del batcher
    # Closing: whatever still waits is answered, not left hanging.
    while True:
        try:
            jobs.get_nowait().future.cancel()
        except queue.Empty:
            return
