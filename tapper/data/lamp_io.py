"""Read and write LaMP's official file formats.

questions.json: a JSON list of `{id, input, profile: [{id, <task fields>,
date?}], user_id?}`. outputs.json (and predictions): `{"task": "LaMP_N",
"golds": [{id, output}]}`.

Conventions decided here:
- A question without `user_id` is its own user (user_id = question id). That
  is LaMP's user-based split: one question per user. Files with several
  questions per user (our builders, OPPU's time split) carry `user_id`.
- Ids may be JSON strings or integers; they become strings.
- Profiles are sorted chronologically on load (stable; undated records keep
  their slots, see chronology.sort_chronologically), then validated.
- Profile fields beyond the task's are kept when they are strings or numbers
  (as strings), so files round-trip; other extra values are dropped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tapper.atomic import atomic_write_text
from tapper.data.chronology import parse_lamp_date, sort_chronologically
from tapper.data.tasks import TaskSpec, canonical_task_name, get_task
from tapper.data.types import LampDataError, LampDataset, Query, Record
from tapper.data.validation import validate_dataset

PathLike = str | os.PathLike[str]

# LaMP's own outputs name movie tagging "LaMP_2"; accept it for 2M and 2N
# when the caller says which one it is.
_AMBIGUOUS_TASK_NAMES = {"LaMP_2": ("LaMP_2N", "LaMP_2M")}


def load_lamp(questions_path: PathLike, outputs_path: PathLike | None = None, task: str | None = None) -> LampDataset:
    """Load and validate a LaMP questions file and (optionally) its golds.

    The task comes from `task` or, when that is None, from the outputs'
    "task"; a mismatch between the two is an error.
    """
    questions_path = str(questions_path)
    golds: dict[str, str] | None = None
    task_name = canonical_task_name(task) if task is not None else None
    if outputs_path is not None:
        outputs_path = str(outputs_path)
        file_task, golds = read_outputs(outputs_path)
        task_name = _reconcile_task(task_name, file_task, outputs_path)
    if task_name is None:
        raise LampDataError(questions_path, None, "task", "no task given and no outputs file to read it from")
    spec = get_task(task_name)

    raw = _read_json(questions_path)
    if not isinstance(raw, list):
        raise LampDataError(
            questions_path, None, None, f"top level must be a JSON list of questions, got {type(raw).__name__}"
        )
    queries = [_parse_query(item, index, spec, questions_path) for index, item in enumerate(raw)]

    if golds is not None:
        for query in queries:
            if query.id not in golds:
                raise LampDataError(outputs_path, query.id, "golds", "question has no gold output")
            gold = golds[query.id]
            if spec.labels is not None and gold not in spec.labels:
                raise LampDataError(
                    outputs_path,
                    query.id,
                    "output",
                    f"gold {gold!r} is not one of the {spec.name} labels {list(spec.labels)}",
                )
            query.output = gold
    dataset = LampDataset(task=spec.name, queries=queries, source=questions_path)
    source = questions_path if outputs_path is None else f"{questions_path} (golds: {outputs_path})"
    validate_dataset(dataset, spec, source=source)
    return dataset


def read_outputs(path: PathLike) -> tuple[str, dict[str, str]]:
    """(task name as written in the file, id -> output) from a LaMP outputs/predictions file."""
    path = str(path)
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise LampDataError(
            path, None, None, f'top level must be an object {{"task", "golds"}}, got {type(raw).__name__}'
        )
    task = raw.get("task")
    if not isinstance(task, str):
        raise LampDataError(path, None, "task", "missing or not a string")
    items = raw.get("golds")
    if not isinstance(items, list):
        raise LampDataError(path, None, "golds", "missing or not a list")
    golds: dict[str, str] = {}
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise LampDataError(path, f"golds[{index}]", None, "each gold must be an object {id, output}")
        gold_id = _as_id(item.get("id"), path, f"golds[{index}]")
        output = item.get("output")
        if not isinstance(output, str):
            raise LampDataError(path, gold_id, "output", "missing or not a string")
        if gold_id in golds:
            raise LampDataError(path, gold_id, "id", "duplicate id in golds")
        golds[gold_id] = output
    return task, golds


def write_questions(ds: LampDataset, path: PathLike) -> Path:
    items = []
    for query in ds.queries:
        items.append(
            {
                "id": query.id,
                "input": query.input,
                "profile": [record_to_json(record) for record in query.profile],
                "user_id": query.user_id,
            }
        )
    return _write_json(path, items)


def write_outputs(task_name: str, golds: dict[str, str], path: PathLike) -> Path:
    """LaMP's outputs format, ids in the given order."""
    return _write_json(
        path,
        {
            "task": canonical_task_name(task_name),
            "golds": [{"id": gold_id, "output": output} for gold_id, output in golds.items()],
        },
    )


def write_predictions(task_name: str, preds: dict[str, str], path: PathLike) -> Path:
    """Predictions use the outputs format too: LaMP's evaluator reads both the same way."""
    return write_outputs(task_name, preds, path)


def _write_json(path: PathLike, obj: Any) -> Path:
    # Compact (no indent): LaMP files are large, and the shipped default dataset must stay small.
    return atomic_write_text(path, json.dumps(obj, ensure_ascii=False) + "\n")


def golds_of(ds: LampDataset) -> dict[str, str]:
    """id -> gold output of every query that has one."""
    return {q.id: q.output for q in ds.queries if q.output is not None}


def record_to_json(record: Record) -> dict[str, Any]:
    """A Record as a LaMP profile item: its id, its fields, and its date as it was written (if any)."""
    item: dict[str, Any] = {"id": record.id, **record.fields}
    if record.raw_date is not None:
        item["date"] = record.raw_date
    elif record.date is not None:
        item["date"] = record.date.isoformat()
    return item


def _reconcile_task(given: str | None, in_file: str, outputs_path: str) -> str:
    if in_file in _AMBIGUOUS_TASK_NAMES:
        if given in _AMBIGUOUS_TASK_NAMES[in_file]:
            return given
        raise LampDataError(
            outputs_path,
            None,
            "task",
            f"{in_file!r} could be {' or '.join(_AMBIGUOUS_TASK_NAMES[in_file])}; pass task= to say which",
        )
    try:
        file_task = canonical_task_name(in_file)
    except ValueError as error:
        raise LampDataError(outputs_path, None, "task", str(error)) from None
    if given is not None and given != file_task:
        raise LampDataError(outputs_path, None, "task", f"outputs are for {file_task} but task {given} was asked for")
    return file_task


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise LampDataError(path, None, None, f"not valid JSON: {error}") from None
    except UnicodeDecodeError as error:
        raise LampDataError(path, None, None, f"not UTF-8 text: {error}") from None


def _as_id(value: Any, path: str, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        problem = "missing" if value is None else f"must be a string or integer, got {type(value).__name__}"
        raise LampDataError(path, where, "id", problem)
    text = str(value)
    if not text:
        raise LampDataError(path, where, "id", "empty id")
    return text


def _as_field_text(value: Any, path: str, record_id: str, name: str) -> str:
    # LaMP-3 scores appear as strings; accept numbers too and keep them as text.
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise LampDataError(path, record_id, name, f"must be a string, got {type(value).__name__}")


def _parse_query(item: Any, index: int, spec: TaskSpec, path: str) -> Query:
    if not isinstance(item, dict):
        raise LampDataError(path, f"[{index}]", None, f"each question must be an object, got {type(item).__name__}")
    query_id = _as_id(item.get("id"), path, f"question [{index}]")
    text = item.get("input")
    if not isinstance(text, str):
        raise LampDataError(path, query_id, "input", "missing or not a string")
    raw_profile = item.get("profile")
    if not isinstance(raw_profile, list):
        raise LampDataError(path, query_id, "profile", "missing or not a list")
    user = item.get("user_id")
    user_id = query_id if user is None else _as_id(user, path, query_id)
    profile = [_parse_record(entry, query_id, i, spec, path) for i, entry in enumerate(raw_profile)]
    return Query(id=query_id, input=text, profile=sort_chronologically(profile), user_id=user_id)


def _parse_record(entry: Any, query_id: str, index: int, spec: TaskSpec, path: str) -> Record:
    where = f"{query_id}/profile[{index}]"
    if not isinstance(entry, dict):
        raise LampDataError(path, where, None, "each profile item must be an object")
    record_id = _as_id(entry.get("id"), path, where)
    fields: dict[str, str] = {}
    for name in spec.profile_fields:
        if name not in entry or entry[name] is None:
            raise LampDataError(
                path, record_id, name, f"profile item of question {query_id!r} lacks this {spec.name} field"
            )
        fields[name] = _as_field_text(entry[name], path, record_id, name)
    for name, value in entry.items():
        if name in ("id", "date") or name in fields:
            continue
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            fields[name] = str(value)
    raw_date = entry.get("date")
    try:
        date = parse_lamp_date(raw_date)
    except ValueError as error:
        raise LampDataError(path, record_id, "date", str(error)) from None
    return Record(id=record_id, fields=fields, date=date, raw_date=None if raw_date is None else str(raw_date))
