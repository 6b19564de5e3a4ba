"""LaMP data: types, task specs, file I/O, validation and splits."""

from tapper.data.lamp_io import golds_of, load_lamp, read_outputs, write_outputs, write_predictions, write_questions
from tapper.data.splits import Splits, make_splits
from tapper.data.tasks import TASK_NAMES, TaskSpec, canonical_task_name, get_task
from tapper.data.types import Example, LampDataError, LampDataset, Query, Record
from tapper.data.validation import validate_dataset

__all__ = [
    "Example",
    "LampDataError",
    "LampDataset",
    "Query",
    "Record",
    "TASK_NAMES",
    "TaskSpec",
    "canonical_task_name",
    "get_task",
    "load_lamp",
    "read_outputs",
    "write_questions",
    "write_outputs",
    "write_predictions",
    "golds_of",
    "validate_dataset",
    "Splits",
    "make_splits",
]
