"""Everything that changes the persisted state: feedback, deleting a user, compaction.

Each runs with the service's writer lock and the state directory's file lock held (one writer at a time across
threads and replicas), in this order:

    catch up with the newest state on disk  ->  check  ->  compute (off the served model)  ->
    write one journal entry durably  ->  apply it to the in-memory state under Loaded.lock (microseconds)

so nothing reaches memory before it is on the disk, and a failure before the write leaves both untouched: no
undo is needed. A full disk (ENOSPC/EDQUOT) is answered 507 in the error shape and the server keeps serving.

Predictions never take the writer lock (deploy.loaded).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from deploy.config import ServeConfig
from deploy.durable import is_no_space
from deploy.errors import ApiError, FeedbackConflict
from deploy.journal import Delta, LiveState
from deploy.loaded import Loaded, now_iso
from deploy.replica import apply_delta, sync
from tapper.data.types import Record

log = logging.getLogger("tapper.serve")


def disk_full(err: OSError, what: str) -> ApiError:
    return ApiError.one(
        507,
        [],
        f"the state directory's disk is full ({err.strerror or err}); {what} was not written "
        "and nothing changed; the server keeps serving",
        "insufficient_storage",
    )


@dataclass
class WriteContext:
    """What the writer functions need from the service."""

    cfg: ServeConfig
    state: LiveState


def check_new_records(history: Sequence[Record], records: Sequence[Record], max_stored: int) -> None:
    """409 naming the field when `records` contradict the stored history: an id already there, a date before
    the user's latest record (feedback comes in time order), or a history that would pass `max_stored`."""
    if len(history) + len(records) > max_stored:
        raise FeedbackConflict(
            ("body", "records"),
            f"the user's history would hold {len(history) + len(records)} records, more than the limit of {max_stored}",
        )
    ids = {r.id for r in history}
    latest = max((r.date for r in history if r.date is not None), default=None)
    for i, r in enumerate(records):
        if r.id in ids:
            raise FeedbackConflict(
                ("body", "records", i, "id"), f"record id {r.id!r} is already in this user's history"
            )
        ids.add(r.id)
        if r.date is not None:
            if latest is not None and r.date < latest:
                raise FeedbackConflict(
                    ("body", "records", i, "date"),
                    f"date {r.date.isoformat()} is before the user's latest record ({latest.isoformat()}); "
                    "feedback must arrive in time order",
                )
            latest = r.date


def start_generation(ctx: WriteContext, ld: Loaded) -> None:
    """The first write for this bundle: a generation on the bundle's own state, or, when another bundle's state
    is there (whose histories `ld` carried over), a snapshot so those histories are kept."""
    fresh = ctx.state.current() is None
    name = ctx.state.start_generation(
        bundle_id=ld.bundle_id,
        bundle_version=ld.bundle.version,
        bundle_path=ld.bundle.path,
        parent=None,
        parent_sequence=0,
        model=None if fresh else ld.model,
        histories=None if fresh else ld.histories,
        updates=None if fresh else ld.updates,
    )
    with ld.lock:
        ld.generation, ld.sequence = name, 0


def _write_and_apply(ctx: WriteContext, ld: Loaded, delta: Delta, what: str) -> None:
    try:
        ctx.state.write_delta(ld.generation, delta)
    except OSError as err:
        if is_no_space(err):
            raise disk_full(err, what) from err
        raise
    try:
        apply_delta(ld, delta, str(ctx.state.delta_path(ld.generation, delta.sequence)))
    except BaseException:
        # On disk but not in memory (e.g. out of memory growing the table): mark `ld` as in no generation, so the
        # next sync adopts the newest one from its base, this delta included.
        log.exception("a written delta could not be applied in memory; the state is re-read on the next sync")
        with ld.lock:
            ld.generation, ld.sequence = "", -1
        raise


def feedback(ctx: WriteContext, ld: Loaded, trainer, user_id: str, records: Sequence[Record]) -> dict:
    """Append `records` (with answers) to the user's history and update their row (Online-Emb); one journal delta.
    The caller holds the writer lock and the file lock."""
    from tapper.online.update import feedback_examples

    sync(ld, ctx.state)  # an update must start from the newest state (errors propagate)
    with ld.lock:
        history = list(ld.histories.get(user_id, []))
        row = ld.model.user_rows.get(user_id)
        table = ld.model.prefix.user_table.weight.detach()
        current = table[row].clone() if row is not None and ld.model.cfg.use_pu else None
        row0 = table[0].clone()
    check_new_records(history, records, ctx.cfg.limits.max_stored_history)
    examples = feedback_examples(ld.task, user_id, history, records)
    if ld.generation is None:
        try:
            start_generation(ctx, ld)
        except OSError as err:
            if is_no_space(err):
                raise disk_full(err, "the feedback") from err
            raise
    skipped = None
    update = None
    if ctx.cfg.mode != "tapper":
        skipped = f"this server answers with mode={ctx.cfg.mode}: the records only extend the history"
    elif not ld.model.cfg.use_pu:
        skipped = "this model has no per-user rows (use_pu=false): the records only extend the history P_q reads"
    elif not examples:
        skipped = f"{ld.task.name} records make no training example: the records only extend the history"
    else:
        seed = int(ld.generation.split("-")[1]) * 1_000_000 + ld.sequence + 1
        update = trainer.update(
            ld.task,
            user_id,
            examples,
            current,
            row0,
            epochs=ctx.cfg.feedback_epochs,
            steps=ctx.cfg.feedback_steps,
            lr=ctx.cfg.feedback_lr,
            seed=seed,
        )
    report = update.report if update else None
    new_users = [] if user_id in ld.model.user_rows else ([user_id] if update else [])
    delta = Delta(
        sequence=ld.sequence + 1,
        users=[user_id] if update else [],
        rows=update.row[None] if update else torch.zeros(0, table.shape[1]),
        new_users=new_users,
        records={user_id: list(records)},
        report=report.to_dict() if report else None,
        written_at=now_iso(),
    )
    _write_and_apply(ctx, ld, delta, "the feedback")
    return {
        "user_id": user_id,
        "accepted": len(records),
        "history_stored": len(history) + len(records),
        "updated": update is not None,
        "skipped": skipped,
        "generation": ld.generation,
        "sequence": delta.sequence,
        "user_row": ld.model.user_rows.get(user_id, 0) if ld.model.cfg.use_pu else 0,
        "report": report.to_dict() if report else None,
    }


def delete_user(ctx: WriteContext, ld: Loaded, user_id: str) -> dict:
    """Remove the user's history and row (journaled; the user is new afterwards). 404 when nothing is held."""
    sync(ld, ctx.state)
    with ld.lock:
        had_row = user_id in ld.model.user_rows
        held = had_row or user_id in ld.histories
        try:
            records = len(ld.histories[user_id]) if user_id in ld.histories else 0
        except ValueError:  # a malformed stored history (HistoryError): it is deleted all the same
            records = None
    if not held:
        raise ApiError.one(404, ["path", "user_id"], "no such user: nothing is stored for it", "not_found")
    if ld.generation is None:
        try:
            start_generation(ctx, ld)
        except OSError as err:
            if is_no_space(err):
                raise disk_full(err, "the deletion") from err
            raise
    width = ld.model.prefix.user_table.embedding_dim
    delta = Delta(
        sequence=ld.sequence + 1, users=[], rows=torch.zeros(0, width), deleted_users=[user_id], written_at=now_iso()
    )
    _write_and_apply(ctx, ld, delta, "the deletion")
    return {
        "user_id": user_id,
        "deleted": True,
        "had_row": had_row,
        "records_deleted": records,
        "generation": ld.generation,
        "sequence": delta.sequence,
    }


def compact(ctx: WriteContext, ld: Loaded, force: bool = False, erase: bool = False) -> str | None:
    """Write the whole state as a new snapshot generation when `compact_every` deltas are due (or `force`), point
    CURRENT at it and prune old generations (all of them when `erase`: a user was deleted and the older
    generations still hold their data). Returns the new generation, or None when there was nothing to do.
    The caller holds the writer lock and the file lock; predictions go on meanwhile (they only read)."""
    sync(ld, ctx.state)
    if ld.generation in (None, "") or ld.sequence < 0 or (not force and ld.sequence < ctx.cfg.compact_every):
        return None
    if ld.sequence == 0 and not erase:
        return None
    name = ctx.state.start_generation(
        bundle_id=ld.bundle_id,
        bundle_version=ld.bundle.version,
        bundle_path=ld.bundle.path,
        parent=ld.generation,
        parent_sequence=ld.sequence,
        model=ld.model,
        histories=ld.histories,
        updates=ld.updates,
    )
    with ld.lock:
        ld.generation, ld.sequence = name, 0
    ctx.state.prune(1 if erase else ctx.cfg.keep_generations, current=name)
    return name
