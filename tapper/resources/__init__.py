"""Data shipped inside the package: the quickstart's default dataset.

`default/` is a small real LaMP_2N (the 111 single authors of the shared subset of
the HuffPost News Category Dataset with at least 9 articles in its 15 categories;
each author's 4 latest articles are queries, the up to 30 before them the profile),
CC BY 4.0; its README.md says how it was built (`tapper build news ...`).
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
            raise FileNotFoundError(
                f"bundled default dataset file missing: {path} (is the package installed with its data?)"
            )
    return questions, outputs, DEFAULT_TASK
