"""What the server holds about one user, for the user's rights over it (access, portability, erasure).

    GET    /users/{id}          history length, latest record date, last feedback time, whether the user has a
                                row, and the norm of that row (how far the personalization moved from nobody's)
    GET    /users/{id}/export   the stored history (LaMP items) and the user's row of the user table
    DELETE /users/{id}          history and row gone (deploy.writer.delete_user): journaled, so it survives a
                                restart and reaches every replica; then an erasing compaction writes a snapshot
                                without the user and removes every older generation. The user is new afterwards.

A per-user model makes this possible: all that is personal is one row and one history, addressable by id, and
removing them removes the user's influence on their predictions (the shared networks were trained on the
Stage-2 users before serving and never change in Online-Emb). What the server cannot reach: the immutable
bundle it was started from (the pipeline's export of the training data and the trained table), which a new
bundle, trained without the user, replaces (deploy/README.md, "Per-user privacy").
"""

from __future__ import annotations

from deploy.errors import ApiError
from deploy.loaded import Loaded
from tapper.data.lamp_io import record_to_json


def _not_found() -> ApiError:
    return ApiError.one(404, ["path", "user_id"], "no such user: nothing is stored for it", "not_found")


def summary(ld: Loaded, user_id: str) -> dict:
    with ld.lock:
        row = ld.model.user_rows.get(user_id)
        history = ld.histories.get(user_id) if user_id in ld.histories else None
        norm = (
            float(ld.model.prefix.user_table.weight.detach()[row].norm())
            if row is not None and ld.model.cfg.use_pu
            else None
        )
        updated = ld.updates.get(user_id)
    if row is None and history is None:
        raise _not_found()
    dates = [r.date for r in history or [] if r.date is not None]
    return {
        "user_id": user_id,
        "known_user": row is not None,
        "history_length": len(history or []),
        "last_record_date": max(dates).isoformat() if dates else None,
        "last_feedback_at": updated,
        "prefix_norm": norm,
        "model_version": ld.bundle.version,
        "generation": ld.generation,
    }


def export(ld: Loaded, user_id: str) -> dict:
    with ld.lock:
        row = ld.model.user_rows.get(user_id)
        history = list(ld.histories.get(user_id, [])) if user_id in ld.histories else None
        values = (
            ld.model.prefix.user_table.weight.detach()[row].clone() if row is not None and ld.model.cfg.use_pu else None
        )
        updated = ld.updates.get(user_id)
    if row is None and history is None:
        raise _not_found()
    cfg = ld.model.cfg
    return {
        "user_id": user_id,
        "model_version": ld.bundle.version,
        "task": ld.task.name,
        "records": [record_to_json(r) for r in history or []],
        "last_feedback_at": updated,
        "prefix_row": None if values is None else {"shape": [cfg.prefix_len, ld.model.d], "values": values.tolist()},
    }
