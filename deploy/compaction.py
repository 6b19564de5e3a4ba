"""Compaction off the request path, with back-off after a failure.

A feedback that makes `compact_every` deltas only *asks* for a compaction; a background thread writes the
snapshot (seconds with a large state) while the feedback is answered and predictions go on. Feedbacks that
arrive meanwhile wait for the writer lock the compaction holds: they append to the journal, and a snapshot
must not miss a delta. A deletion asks for an *erasing* compaction: the snapshot is written at once and every
older generation, which still holds the deleted user's data, is removed.

A failed compaction (full disk, I/O error) only leaves the journal longer. It is retried after
`compact_backoff_s`, doubling per consecutive failure up to `compact_backoff_max_s`; before, every later
feedback retried it under the lock (a slow full snapshot on each request).

The thread holds only a weak reference to the service, so a service nobody uses any more is collected and its
thread ends; `close()` ends it at once.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass, field

log = logging.getLogger("tapper.serve")


@dataclass
class CompactionStats:
    done: int = 0
    failed: int = 0
    consecutive_failures: int = 0
    retry_at: float = 0.0  # monotonic time before which no retry is made
    last_error: str | None = None
    last_generation: str | None = None
    history: list[str] = field(default_factory=list)  # results, bounded (for /info and tests)


class Compactor:
    def __init__(self, service, backoff_s: float, backoff_max_s: float):
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s
        self.stats = CompactionStats()
        self._wanted = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._erase = False
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_loop, args=(weakref.ref(service), self), name="tapper-compactor", daemon=True
        )
        self._thread.start()

    def request(self, erase: bool = False) -> None:
        self._erase |= erase
        self._idle.clear()
        self._wanted.set()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no compaction is asked for or running (tests, shutdown). False on timeout."""
        return self._idle.wait(timeout)

    def close(self) -> None:
        self._stop.set()
        self._wanted.set()
        self._thread.join(timeout=30)

    def run_once(self, service) -> None:
        erase, self._erase = self._erase, False
        if not erase and time.monotonic() < self.stats.retry_at:
            return  # backing off; the next request after retry_at tries again
        try:
            name = service.compact(force=erase, erase=erase)
        except Exception as err:  # noqa: BLE001 - logged and retried later; the journal keeps every delta meanwhile
            s = self.stats
            s.failed += 1
            s.consecutive_failures += 1
            delay = min(self.backoff_max_s, self.backoff_s * 2 ** (s.consecutive_failures - 1))
            s.retry_at = time.monotonic() + delay
            s.last_error = f"{type(err).__name__}: {err}"
            s.history = (s.history + [f"failed: {s.last_error}"])[-20:]
            log.error("compaction failed (%s); the journal keeps growing; next try in %.0f s", err, delay)
            self._erase |= erase  # an erasure still owed is retried
            return
        s = self.stats
        s.consecutive_failures, s.retry_at, s.last_error = 0, 0.0, None
        if name:
            s.done += 1
            s.last_generation = name
            s.history = (s.history + [name])[-20:]


def _loop(ref, compactor: Compactor) -> None:
    while not compactor._stop.is_set():
        compactor._wanted.wait(timeout=1.0)
        if compactor._stop.is_set():
            break
        if not compactor._wanted.is_set():
            if ref() is None:
                break
            continue
        compactor._wanted.clear()
        service = ref()
        if service is None:
            break
        try:
            compactor.run_once(service)
        finally:
            del service
            if not compactor._wanted.is_set():
                compactor._idle.set()
    compactor._idle.set()
