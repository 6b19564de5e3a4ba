"""The serving stack's live state on disk: generations, each a base plus an append-only journal of feedback deltas.

Writing the whole user table and every history on each feedback costs O(users) per request; at millions of
users that is gigabytes per click. Here a feedback writes only what it changed (the user's new row values and
new records, a few KB), and the full state is written only every `compact_every` feedbacks::

    <state_dir>/
      CURRENT                    {"generation": "gen-000003", "bundle_id": ..., "bundle_version": ...,
                                  "updated_at": ...}
      gen-000003/
        meta.json                {"generation", "bundle_id", "bundle_version", "base": "bundle" | "snapshot",
                                  "bundle_path", "parent", "parent_sequence", "written_at"}
        tapper/                  snapshot only: TapPer.save() of the model as of the generation's start
        histories.jsonl          snapshot only: every user's history store as of the generation's start
                                 (deploy.histories; snapshots written before JSON lines hold histories.json)
        journal/
          00000001.safetensors   delta 1: tensor "rows" [k, L*d] = the new values of k users' rows; metadata
          00000002.safetensors   "delta" = {"sequence", "users" (k, in row order), "new_users" (appended to the
          ...                    table in this order first), "records" {user: [LaMP items]}, "report", "written_at"}

The state of a generation after delta n = its base (the bundle's own state for "bundle", the snapshot for
"snapshot") with deltas 1..n applied in order. A delta is one file written to a temporary name, fsynced, renamed,
and its directory fsynced (deploy.durable), so once a feedback is acknowledged it is there whole after a crash
of the process or the machine, and a crash before that leaves it absent; a gap in the numbering (never written
by a writer holding the lock) is an error. A generation is never modified except by appending deltas;
compaction writes a new snapshot generation aside (every file fsynced), renames it into place and then replaces
CURRENT the same way, so a reader always finds a complete base and a journal that extends it.

A delta may also delete users (`deleted_users`, DELETE /users/{id}): their history goes, their row is zeroed and
their id replaced by a tombstone (`tombstone(row)`, which no request can name: ids may not hold control
characters), so row numbers stay positional and every replica replays the same table. A snapshot then holds
neither the records nor the row.

Snapshots also hold `updates.json` ({user: time of the user's last feedback}) for GET /users/{id}.

Temporary names a crash left behind (`.gen-*.tmp-*` directories, `.*.tmp` files) are removed at start, under the
writers' lock, so no other writer can be in the middle of one (`LiveState.remove_stale_temporaries`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save as save_bytes

from deploy.bundle import BundleError, read_bundle, read_histories
from deploy.durable import durable_write_bytes, fsync_dir, fsync_tree
from deploy.histories import (
    HISTORIES_FILE,
    HistoryStore,
    histories_file,
    histories_from_json,
    histories_to_json,
    write_histories,
)
from tapper.data.types import Record

CURRENT_FILE = "CURRENT"
LOCK_FILE = ".lock"
META_FILE = "meta.json"
JOURNAL_DIR = "journal"
SNAPSHOT_STATE = "tapper"
UPDATES_FILE = "updates.json"
GEN_RE = re.compile(r"^gen-(\d{6,})$")
DELTA_RE = re.compile(r"^(\d{8})\.safetensors$")
TMP_GEN_RE = re.compile(r"^\.gen-\d{6,}\.tmp-")
TOMBSTONE_PREFIX = "\x00deleted:"


def tombstone(row: int) -> str:
    """The id a deleted user's row keeps in the table (positional rows; deterministic, so replicas agree)."""
    return f"{TOMBSTONE_PREFIX}{row}"


def is_tombstone(user_id: str) -> bool:
    return user_id.startswith(TOMBSTONE_PREFIX)


class StateError(ValueError):
    """The live state on disk is inconsistent (names the path)."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class Delta:
    """What one feedback changed."""

    sequence: int
    users: list[str]  # users whose rows are in `rows`, in that order
    rows: torch.Tensor  # [len(users), L*d]; empty when the feedback updated no row
    new_users: list[str] = field(default_factory=list)  # appended to the table, in this order, before rows are set
    records: dict[str, list[Record]] = field(default_factory=dict)  # appended to each user's history
    report: dict | None = None
    written_at: str = ""
    deleted_users: list[str] = field(default_factory=list)  # history removed, row zeroed, id tombstoned (first)


class LiveState:
    """Reads and writes the generations of one state directory. Writers must hold `lock_path`.

    `spool_dir`: the history stores it reads (snapshots', bundles') keep their unread users' lines in a scratch
    file there instead of memory (deploy.histories); None: in memory."""

    def __init__(self, root: str | Path, spool_dir: str | Path | None = None):
        self.root = Path(root)
        self.spool_dir = Path(spool_dir) if spool_dir is not None else None

    @property
    def lock_path(self) -> Path:
        return self.root / LOCK_FILE

    def gen_dir(self, name: str) -> Path:
        return self.root / name

    # --- reading -----------------------------------------------------------------------------------

    def current(self) -> dict | None:
        path = self.root / CURRENT_FILE
        try:
            cur = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        if not GEN_RE.match(str(cur.get("generation", ""))):
            raise StateError(f"{path}: field 'generation' is not a generation name: {cur.get('generation')!r}")
        return cur

    def meta(self, name: str) -> dict:
        path = self.gen_dir(name) / META_FILE
        meta = json.loads(path.read_text())
        if meta.get("base") not in ("bundle", "snapshot"):
            raise StateError(f"{path}: field 'base' must be 'bundle' or 'snapshot', got {meta.get('base')!r}")
        return meta

    def snapshot_state_dir(self, name: str) -> Path:
        return self.gen_dir(name) / SNAPSHOT_STATE

    def snapshot_histories(self, name: str) -> HistoryStore:
        path = histories_file(self.gen_dir(name))
        if not path.is_file():
            raise StateError(f"{path}: missing (a snapshot generation holds every user's history)")
        return HistoryStore.read(path, self.spool_dir)

    def sequences(self, name: str) -> list[int]:
        journal = self.gen_dir(name) / JOURNAL_DIR
        if not journal.is_dir():
            return []
        return sorted(int(m.group(1)) for p in journal.iterdir() if (m := DELTA_RE.match(p.name)))

    def deltas_after(self, name: str, sequence: int) -> Iterator[Delta]:
        """Deltas sequence+1, sequence+2, ... of generation `name`, in order."""
        expected = sequence + 1
        for seq in self.sequences(name):
            if seq <= sequence:
                continue
            path = self.delta_path(name, seq)
            if seq != expected:
                raise StateError(f"{path}: journal gap, expected delta {expected} before {seq}")
            yield self._read_delta(path)
            expected += 1

    def delta_path(self, name: str, seq: int) -> Path:
        return self.gen_dir(name) / JOURNAL_DIR / f"{seq:08d}.safetensors"

    @staticmethod
    def _read_delta(path: Path) -> Delta:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("delta", "null") or "null")
            rows = f.get_tensor("rows")
        if not isinstance(meta, dict):
            raise StateError(f"{path}: missing the 'delta' metadata")
        users = meta.get("users")
        if not isinstance(users, list) or len(users) != rows.shape[0]:
            raise StateError(f"{path}: field 'users' must list one user per row ({rows.shape[0]} rows)")
        return Delta(
            sequence=int(meta["sequence"]),
            users=users,
            rows=rows,
            new_users=list(meta.get("new_users", [])),
            records=histories_from_json(meta.get("records", {}), f"{path}: records"),
            report=meta.get("report"),
            written_at=meta.get("written_at", ""),
            deleted_users=list(meta.get("deleted_users", [])),
        )

    def snapshot_updates(self, name: str) -> dict[str, str]:
        """{user: time of the user's last feedback} as of a snapshot generation's start ({} if it has none)."""
        path = self.gen_dir(name) / UPDATES_FILE
        try:
            return dict(json.loads(path.read_text()))
        except FileNotFoundError:
            return {}

    def histories(self, name: str) -> HistoryStore:
        """Every user's history at the end of generation `name`'s journal (its base's, plus every delta's records).

        For a "bundle"-based generation the base histories are those of the bundle the generation recorded, if
        that directory still exists."""
        meta = self.meta(name)
        if meta["base"] == "snapshot":
            out = self.snapshot_histories(name)
        else:
            out = _histories_of_bundle(meta.get("bundle_path"), self.spool_dir)
        for delta in self.deltas_after(name, 0):
            for user in delta.deleted_users:
                if user in out:
                    del out[user]  # without parsing the user's line (it may be malformed)
            for user, recs in delta.records.items():
                out.setdefault(user, []).extend(recs)
        return out

    def generation_numbers(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.root.iterdir() if (m := GEN_RE.match(p.name)))

    # --- writing (hold the lock) -------------------------------------------------------------------

    def write_delta(self, name: str, delta: Delta) -> Path:
        path = self.delta_path(name, delta.sequence)
        if not (self.gen_dir(name) / META_FILE).is_file():
            # The generation was removed under us (e.g. the state directory was wiped): never start a headless journal.
            raise StateError(f"{self.gen_dir(name)}: no such generation; reload the server")
        have = self.sequences(name)
        if (have[-1] if have else 0) != delta.sequence - 1:
            raise StateError(
                f"{path}: journal of {name} ends at {have[-1] if have else 0}, cannot append {delta.sequence}"
            )
        meta = {
            "sequence": delta.sequence,
            "users": delta.users,
            "new_users": delta.new_users,
            "records": histories_to_json(delta.records),
            "report": delta.report,
            "written_at": delta.written_at or _now(),
        }
        if delta.deleted_users:
            meta["deleted_users"] = delta.deleted_users
        rows = delta.rows.detach().cpu().contiguous()
        path.parent.mkdir(parents=True, exist_ok=True)
        # Serialized first, then written, fsynced and renamed (deploy.durable): acknowledged means on the disk.
        durable_write_bytes(path, save_bytes({"rows": rows}, metadata={"delta": json.dumps(meta, ensure_ascii=False)}))
        return path

    def start_generation(
        self,
        *,
        bundle_id: str,
        bundle_version: str,
        bundle_path: Path,
        parent: str | None,
        parent_sequence: int,
        model=None,
        histories: Mapping[str, Sequence[Record]] | None = None,
        updates: Mapping[str, str] | None = None,
    ) -> str:
        """Write a new generation and point CURRENT at it.

        With `model` and `histories` it is a snapshot of them (and `updates`: each user's last feedback time);
        without, it starts from the bundle's own state."""
        self.root.mkdir(parents=True, exist_ok=True)
        nums = self.generation_numbers()
        name = f"gen-{(nums[-1] + 1 if nums else 1):06d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=self.root))
        try:
            base = "bundle"
            if model is not None:
                base = "snapshot"
                model.save(tmp / SNAPSHOT_STATE)
                write_histories(tmp / HISTORIES_FILE, histories or {})
                (tmp / UPDATES_FILE).write_text(json.dumps(dict(updates or {}), ensure_ascii=False))
            (tmp / JOURNAL_DIR).mkdir()
            (tmp / META_FILE).write_text(
                json.dumps(
                    {
                        "generation": name,
                        "bundle_id": bundle_id,
                        "bundle_version": bundle_version,
                        "base": base,
                        "bundle_path": str(bundle_path),
                        "parent": parent,
                        "parent_sequence": parent_sequence,
                        "written_at": _now(),
                    },
                    indent=2,
                    ensure_ascii=False,
                )
                + "\n"
            )
            for p in (tmp, tmp / JOURNAL_DIR):
                os.chmod(p, 0o755)
            fsync_tree(tmp)  # every byte on the disk before the name makes it visible
            os.replace(tmp, self.gen_dir(name))
            fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.set_current(name, bundle_id, bundle_version)
        return name

    def set_current(self, name: str, bundle_id: str, bundle_version: str) -> None:
        data = (
            json.dumps(
                {"generation": name, "bundle_id": bundle_id, "bundle_version": bundle_version, "updated_at": _now()},
                indent=2,
            )
            + "\n"
        )
        durable_write_bytes(self.root / CURRENT_FILE, data.encode())

    def remove_stale_temporaries(self) -> list[str]:
        """Remove what crashed writers left: temporary generation directories (`.gen-*.tmp-*`) and temporary files
        (`.<name>.*.tmp`) in the state directory and in journals. Call with the writers' lock held (no writer is
        then in the middle of one). Returns the removed paths, relative to the state directory."""
        removed = []
        if not self.root.is_dir():
            return removed
        for p in self.root.iterdir():
            if p.is_dir() and TMP_GEN_RE.match(p.name):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
            elif (
                p.is_file()
                and p.name.endswith(".tmp")
                and (p.name.startswith(".") or p.name.startswith(CURRENT_FILE + "."))
            ):
                p.unlink(missing_ok=True)
                removed.append(p.name)
        for n in self.generation_numbers():
            journal = self.gen_dir(f"gen-{n:06d}") / JOURNAL_DIR
            if journal.is_dir():
                for p in journal.iterdir():
                    if p.name.endswith(".tmp"):
                        p.unlink(missing_ok=True)
                        removed.append(str(p.relative_to(self.root)))
        if removed:
            fsync_dir(self.root)
        return removed

    def prune(self, keep_generations: int, current: str) -> list[str]:
        """Remove all but the newest `keep_generations` generations (never `current`); returns the removed names.

        Old generations stay a little while so a replica that is reading one finishes before it goes. After a
        user is deleted, `keep_generations=1` removes every older generation (they hold the user's data); a
        replica that was reading one then adopts the newest on its next sync."""
        nums = self.generation_numbers()
        removed = []
        for n in nums[: max(0, len(nums) - keep_generations)]:
            name = f"gen-{n:06d}"
            if name != current:
                shutil.rmtree(self.gen_dir(name), ignore_errors=True)
                removed.append(name)
        if removed:
            fsync_dir(self.root)
        return removed


def _histories_of_bundle(path: str | None, spool_dir: Path | None = None) -> HistoryStore:
    """The histories of the bundle at `path`, or none if that bundle is gone."""
    if not path:
        return HistoryStore()
    try:
        info = read_bundle(path)
    except BundleError:
        return HistoryStore()
    return read_histories(info, spool_dir)  # a corrupt histories file is an error, as anywhere else
