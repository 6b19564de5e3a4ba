"""What every builder shares: writing a validated LaMP build and describing it.

A build directory holds questions.json and outputs.json (LaMP's format) and a
README.md saying where the data came from, under which licence, the command
that rebuilds it, and what is inside. Each file is written atomically, and
the dataset is validated before anything is written, so a failed build never
leaves a partial or invalid directory behind.
"""

from __future__ import annotations

import shlex
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tapper.atomic import atomic_write_text
from tapper.data.lamp_io import golds_of, write_outputs, write_questions
from tapper.data.splits import user_history
from tapper.data.types import LampDataset
from tapper.data.validation import validate_dataset

QUESTIONS_FILE = "questions.json"
OUTPUTS_FILE = "outputs.json"
README_FILE = "README.md"


@dataclass(frozen=True)
class BuildSummary:
    task: str
    out_dir: Path
    users: int
    queries: int
    records: int  # distinct history records over all users

    def describe(self) -> str:
        return (
            f"{self.task}: {self.users} users, {self.queries} queries, {self.records} history records -> {self.out_dir}"
        )


def command_line(kind: str, options: dict[str, Any]) -> str:
    """The `tapper build <kind> ...` command equivalent to a builder call, for READMEs."""
    parts = ["tapper", "build", kind]
    for name, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        parts.append(flag if value is True else f"{flag} {shlex.quote(str(value))}")
    return " ".join(parts)


def summarize(ds: LampDataset, out_dir: Path) -> BuildSummary:
    by_user = ds.by_user()
    records = sum(len(user_history(queries)) for queries in by_user.values())
    return BuildSummary(task=ds.task, out_dir=out_dir, users=len(by_user), queries=len(ds.queries), records=records)


def counts_section(ds: LampDataset) -> str:
    """Markdown lines with the counts and date range of a dataset."""
    by_user = ds.by_user()
    lengths = [len(user_history(queries)) for queries in by_user.values()]
    dates = [r.date for q in ds.queries for r in q.profile if r.date is not None]
    lines = [
        f"- users: {len(by_user)}",
        f"- queries: {len(ds.queries)}",
        f"- history records: {sum(lengths)} (per user: min {min(lengths, default=0)}, "
        f"median {statistics.median(lengths) if lengths else 0:g}, max {max(lengths, default=0)})",
    ]
    if dates:
        lines.append(f"- history dates: {min(dates).isoformat()} .. {max(dates).isoformat()}")
    return "\n".join(lines)


def write_build(ds: LampDataset, out_dir: str | Path, readme: str) -> BuildSummary:
    """Validate, then write questions.json, outputs.json and README.md atomically."""
    out_dir = Path(out_dir)
    if not ds.queries:
        raise ValueError("the build produced no queries; loosen --min-history or check the source")
    validate_dataset(ds, source=f"build for {out_dir}")
    write_questions(ds, out_dir / QUESTIONS_FILE)
    write_outputs(ds.task, golds_of(ds), out_dir / OUTPUTS_FILE)
    atomic_write_text(out_dir / README_FILE, readme.rstrip() + "\n")
    return summarize(ds, out_dir)
