"""A LaMP dataset read, validated and split once: what every stage and method of one run works on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tapper.data.lamp_io import load_lamp
from tapper.data.splits import Splits, make_splits
from tapper.data.tasks import get_task
from tapper.data.validation import validate_dataset


@dataclass
class PreparedData:
    task: object  # TaskSpec adapted to the dataset's own query wording
    splits: Splits
    n_users: int
    n_records: int


def prepare_data(task_name: str | None, questions: str | Path, outputs: str | Path, stage2_users: int) -> PreparedData:
    ds = load_lamp(questions, outputs, task_name)
    spec = get_task(ds.task).adapted_to(q.input for q in ds.queries)
    validate_dataset(ds, spec, source=str(questions))
    splits = make_splits(ds, spec, stage2_users)
    n_records = sum(len(q.profile) for q in ds.queries)
    return PreparedData(task=spec, splits=splits, n_users=len(ds.users()), n_records=n_records)


def tokenizer_corpus(data: PreparedData) -> list[str]:
    """Texts the tiny backbone's tokenizer is trained on: every prompt, answer and record."""
    task, s = data.task, data.splits
    texts = []
    for ex in s.stage1_train + s.stage2_train + s.eval:
        texts.append(task.prompt(ex.input))
    # Answers the models train on, never the evaluation golds (the label names come with the task below).
    for ex in s.stage1_train + s.stage2_train:
        if ex.target is not None:
            texts.append(task.format_target(ex.target))
    for ex in s.eval:
        texts.extend(task.record_text(r) for r in ex.history)
    if task.labels:
        texts.extend(task.labels)
    return texts
