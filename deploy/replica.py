"""Bringing a Loaded model to the state on disk: loading a bundle, adopting a generation, replaying its journal.

Every function here is called with the service's writer lock held (deploy.service), so no other thread of this
process changes the per-user state meanwhile. Work that reads files or copies a table happens outside
`Loaded.lock`; only the final swap or row write happens under it, so predictions wait for microseconds, not
for a snapshot being read. Several replicas (or workers) may share one state directory: each catches up before
it writes (under the file lock, deploy.writer) and a background thread picks up other replicas' deltas within
`sync_seconds` (deploy.service).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time

import torch
from torch import nn

from deploy.bundle import read_bundle
from deploy.config import ServeConfig
from deploy.histories import merge_histories
from deploy.journal import Delta, LiveState, StateError, tombstone
from deploy.loaded import Loaded, bundle_id, read_snapshot_table

log = logging.getLogger("tapper.serve")


def build(cfg: ServeConfig, state: LiveState) -> Loaded:
    """Load the bundle at cfg.model_dir and bring it to the newest generation of it in the state directory."""
    from tapper.model.backbone import load_backbone_dir, tensor_hash
    from tapper.model.tapper import TapPer

    info = read_bundle(cfg.model_dir)
    bid = bundle_id(info)
    # In the precision the state was trained in (a state saved before backbone hashes were file hashes recorded
    # the hash of the tensors as loaded in it).
    bb = load_backbone_dir(info.stage1_dir, dtype=TapPer.saved_dtype(info.state_dir))
    state_meta = json.loads((info.state_dir / "tapper_config.json").read_text())
    expected = state_meta.get("backbone_hash") or info.backbone_hash
    if cfg.verify_backbone and expected:
        got = bb.weights_hash
        if got != expected and tensor_hash(bb.model) != expected:
            raise ValueError(
                f"{info.stage1_dir}: weights hash {got[:16]}… is not the backbone the TapPer state "
                f"was trained on ({expected[:16]}…); the bundle is inconsistent"
            )
    # scratch_dir: the user table is paged there from the start (filled from the file in chunks, never a full
    # copy in memory), and history files read below are spooled there.
    model = TapPer.load(info.state_dir, bb.model, table_dir=cfg.scratch_dir)
    if cfg.mode != "tapper" and model.cfg.use_bridge:
        # "base" and "rag" answer with the Stage-1 backbone alone: the bridge LoRA is switched off for good.
        model.plm.lm.base_model.disable_adapter_layers()
    ld = Loaded(
        bundle=info,
        bundle_id=bid,
        task=info.task_spec(),
        backbone=bb,
        model=model,
        histories=None,
        generation=None,
        sequence=0,
        loaded_at=time.time(),
        spool_dir=cfg.scratch_dir,
    )
    cur = state.current()
    if cur and cur.get("bundle_id") == bid:
        adopt(ld, state, cur["generation"], fresh=True)
        return ld
    ld.histories = ld.bundle_histories().copy()
    if cur:
        # A generation of another bundle: keep the users' records, not the rows trained for another model.
        with contextlib.suppress(FileNotFoundError):
            ld.histories = merge_histories(ld.histories, state.histories(cur["generation"]))
    return ld


def adopt(ld: Loaded, state: LiveState, name: str, fresh: bool = False) -> None:
    """Make `ld` the state of generation `name`: its base, then every delta of its journal.

    `fresh`: ld.model is the bundle's state as loaded and nobody reads it yet. The base is read aside and
    swapped in whole under the lock; if reading fails nothing changed. If replaying the journal fails half way,
    `ld` is at a consistent earlier sequence and the next sync goes on from there."""
    meta = state.meta(name)
    if meta.get("bundle_id") != ld.bundle_id:
        raise StateError(f"{state.gen_dir(name)}: belongs to bundle {meta.get('bundle_id')}, not {ld.bundle_id}")
    if meta["base"] == "snapshot":
        snap = read_snapshot_table(ld.model, state.snapshot_state_dir(name))
        histories = state.snapshot_histories(name)
        updates = state.snapshot_updates(name)
    else:
        snap = None if fresh else read_snapshot_table(ld.model, ld.bundle.state_dir)
        histories = ld.bundle_histories().copy()
        updates = {}
    with ld.lock:
        if snap is not None:
            ld.model.prefix.user_table = snap.table
            ld.model.user_ids = snap.user_ids
            ld.model.user_rows = {u: i + 1 for i, u in enumerate(snap.user_ids)}
        ld.histories, ld.updates = histories, updates
        ld.generation, ld.sequence = name, 0
    catch_up(ld, state)


def catch_up(ld: Loaded, state: LiveState) -> int:
    """Apply the deltas of ld.generation's journal that ld has not seen, in order; returns how many."""
    n = 0
    for delta in state.deltas_after(ld.generation, ld.sequence):
        apply_delta(ld, delta, str(state.delta_path(ld.generation, delta.sequence)))
        n += 1
    return n


def apply_delta(ld: Loaded, delta: Delta, where: str) -> None:
    """Apply one delta (deleted users, new users, row values, records) to the in-memory state, atomically for
    readers: a table that must grow is copied aside first, then everything changes under the lock."""
    from tapper.online.update import add_users

    model = ld.model
    clash = [u for u in delta.new_users if u in model.user_rows]
    missing = [u for u in delta.users if u not in model.user_rows and u not in delta.new_users]
    if clash or missing:
        raise StateError(f"{where}: users {clash or missing} do not fit the table this delta extends")
    grown = _grown_table(model, len(delta.new_users))
    with ld.lock:
        if grown is not None:
            model.prefix.user_table = grown
        table = model.prefix.user_table.weight
        for user in delta.deleted_users:
            _delete_in_memory(ld, user)
        add_users(model, delta.new_users)  # room was made above: this only records the ids
        if delta.users:
            with torch.no_grad():
                table = model.prefix.user_table.weight
                table[[model.user_rows[u] for u in delta.users]] = delta.rows.to(table.dtype).to(table.device)
        for user, recs in delta.records.items():
            # A new list (never extended in place): a prediction may hold the old one (deploy.loaded).
            ld.histories[user] = list(ld.histories.get(user, [])) + list(recs)
        for user in {*delta.users, *delta.records}:
            if delta.written_at:
                ld.updates[user] = delta.written_at
        ld.sequence = delta.sequence


def _delete_in_memory(ld: Loaded, user: str) -> None:
    """The user's history and last-update time go; their row is zeroed and their id becomes a tombstone (rows are
    positional: the row stays, holding nothing, so every replica's table keeps the same layout)."""
    model = ld.model
    if user in ld.histories:
        del ld.histories[user]  # not pop(): that would parse the stored line first, and a malformed one would fail
    ld.updates.pop(user, None)
    row = model.user_rows.pop(user, None)
    if row is not None and model.cfg.use_pu:
        with torch.no_grad():
            model.prefix.user_table.weight[row] = 0
    if row is not None:
        model.user_ids[row - 1] = tombstone(row)
        model.user_rows[tombstone(row)] = row


def _grown_table(model, n_new: int) -> nn.Embedding | None:
    """A copy of the user table with room for `n_new` more users, when it has none (the same growth rule as
    tapper.online.update.add_users: spare rows, a quarter more at a time), else None. Made outside the lock:
    only writers change rows, and the caller is the one writer."""
    from tapper.model.paged_table import fill_in_chunks, paged_tensor
    from tapper.online.update import GROWTH_FRACTION, MIN_GROWTH_ROWS

    if not n_new or not model.cfg.use_pu:
        return None
    old = model.prefix.user_table
    needed = model.rows_in_use + n_new
    if needed <= old.num_embeddings:
        return None
    capacity = max(needed, old.num_embeddings + max(MIN_GROWTH_ROWS, int(old.num_embeddings * GROWTH_FRACTION)))
    table_dir = getattr(model, "table_dir", None)
    if table_dir is not None:
        weight = paged_tensor(table_dir, capacity, old.embedding_dim, old.weight.dtype)
        fill_in_chunks(weight, old.weight, old.num_embeddings)
    else:
        weight = torch.zeros(capacity, old.embedding_dim, dtype=old.weight.dtype, device=old.weight.device)
        with torch.no_grad():
            weight[: old.num_embeddings].copy_(old.weight)
    grown = nn.Embedding(capacity, old.embedding_dim, _weight=weight)
    grown.weight.requires_grad_(old.weight.requires_grad)
    return grown


def sync(ld: Loaded, state: LiveState) -> bool:
    """Catch up with the newest state of this bundle written by any process; True if anything changed."""
    cur = state.current()
    if not cur or cur.get("bundle_id") != ld.bundle_id:
        return False
    if cur["generation"] == ld.generation:
        return catch_up(ld, state) > 0
    adopt(ld, state, cur["generation"])
    log.info("synced to %s (+%d deltas)", ld.generation, ld.sequence)
    return True
