"""Data shipped inside the package: the quickstart's default dataset.

`default/` is a small real LaMP_2N (the 30 most active single authors of the
HuffPost News Category Dataset, one query each, profiles capped to the 30 most
recent articles), CC BY 4.0; its README.md says how it was built.
"""
from __future__ import annotations

from pathlib import Path

DEFAULT_DIR = Path(__file__).resolve().parent / "default"
DEFAULT_TASK = "LaMP_2N"


def default_dataset_paths() -> tuple[Path, Path, str]:
    """(questions.json, outputs.json, task name) of the bundled default dataset."""
    questions, outputs = DEFAULT_DIR / "questions.json", DEFAULT_DIR / "outputs.json"
    for path in (questions, outputs):
        if not path.is_file():
            raise FileNotFoundError(f"bundled default dataset file missing: {path} (is the package installed with its data?)")
    return questions, outputs, DEFAULT_TASK
