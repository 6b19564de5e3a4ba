"""Online-Emb updates on a copy of the affected row, so that training never touches what predictions read.

tapper.online.update.update_users trains in place: it switches the model to train mode (the bridge's dropout
on), swaps the user table for a parameter holding only the affected rows, and writes them back at the end.
Run on the served model, every prediction would have had to wait for it (one lock serialized everything), or
would have run with dropout on and a stand-in table.

So the service keeps a *twin* of the model for training: every module object is its own (its own train/eval
flags, its own user table), but every parameter and buffer is the served model's own tensor, shared, not
copied (the backbone, bridge and prefix networks are frozen in Online-Emb, so sharing them is read-only; the
twin costs a few MB of module objects, not a second model). Each update gives the twin a two-row table
(row 0, and a copy of the user's current row or none for a new user), runs the same `update_users` on it, and
returns the new row. The writer then persists it and swaps it into the served table under the state lock
(deploy.writer), or throws it away if the write failed: the served model never holds a half-trained row.

The result is the row `update_users` computes on the served model itself (same examples, same seed, same
optimizer; tests/test_serving_production.py pins that), except that the twin's table has no other rows.
The twin has its own tokenizer and vector cache: tokenizers are not safe to share between threads.

Training runs on one dedicated thread at a lower CPU priority (`nice`, Linux: per thread; +10 by default,
ServeConfig.feedback_nice): when predictions and a feedback's forward and backward passes want the same cores,
the kernel gives them to the predictions, and the feedback (which nobody waits for interactively) takes longer.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn

from deploy.loaded import ServingVectors

log = logging.getLogger("tapper.serve")


def lower_priority(nice: int) -> None:
    """Raise the calling thread's nice value by `nice` (Linux applies setpriority to one thread when given its id;
    threads it starts, such as torch's OpenMP team, inherit it). Best effort elsewhere."""
    if nice <= 0:
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except (AttributeError, OSError) as err:
        log.debug("could not lower the feedback trainer's priority: %s", err)


@dataclass
class RowUpdate:
    row: torch.Tensor  # the user's new row [L*d]
    report: object  # tapper.online.update.UpdateReport (users, new_users, steps, losses...)


class RowTrainer:
    def __init__(self, model, backbone_model: nn.Module, tokenizer, nice: int = 10):
        memo: dict[int, object] = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
        # Per-user bookkeeping is the served model's, not the twin's: do not copy it (it can hold millions of ids).
        memo[id(model.user_ids)] = []
        memo[id(model.user_rows)] = {}
        self.twin = copy.deepcopy(model, memo)
        self.twin.table_dir = None  # the twin's tiny tables live in memory even when the served table is paged
        self.twin.prefix.user_table = nn.Embedding(1, model.prefix.user_table.embedding_dim)
        self.tokenizer = copy.deepcopy(tokenizer)
        self.vectors = ServingVectors(backbone_model, self.tokenizer)
        self._pool = ThreadPoolExecutor(
            1, thread_name_prefix="tapper-trainer", initializer=lower_priority, initargs=(nice,)
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    def update(
        self,
        task,
        user: str,
        examples: list,
        current_row: torch.Tensor | None,
        row0: torch.Tensor,
        *,
        epochs: float,
        steps: int | None,
        lr: float | None,
        seed: int,
    ) -> RowUpdate:
        """Train `user`'s row on `examples` (tapper.online.update.feedback_examples); `current_row` is a copy of the
        user's row (None: a new user, whose row starts at zero like add_users gives it). Runs on the trainer's own
        low-priority thread; the caller waits for it."""
        return self._pool.submit(
            self._update, task, user, examples, current_row, row0, epochs=epochs, steps=steps, lr=lr, seed=seed
        ).result()

    def _update(
        self,
        task,
        user: str,
        examples: list,
        current_row: torch.Tensor | None,
        row0: torch.Tensor,
        *,
        epochs: float,
        steps: int | None,
        lr: float | None,
        seed: int,
    ) -> RowUpdate:
        from tapper.online.update import update_users

        twin = self.twin
        served = twin.prefix.user_table
        rows = [row0] if current_row is None else [row0, current_row]
        weight = torch.stack([r.detach().clone() for r in rows])
        twin.prefix.user_table = nn.Embedding(weight.shape[0], weight.shape[1], _weight=weight)
        twin.user_ids = [] if current_row is None else [user]
        twin.user_rows = {} if current_row is None else {user: 1}
        try:
            report = update_users(
                twin, task, self.tokenizer, self.vectors, examples, "emb", epochs=epochs, steps=steps, lr=lr, seed=seed
            )
            row = twin.prefix.user_table.weight.detach()[twin.user_rows[user]].clone()
        finally:
            twin.prefix.user_table = served
            twin.user_ids, twin.user_rows = [], {}
        return RowUpdate(row=row, report=report)
