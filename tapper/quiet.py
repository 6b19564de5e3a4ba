"""Offline and quiet: the environment and warning filters every tapper entry point sets first.

Each filter names one known message from a pinned dependency that we cannot fix at its source (it
comes from their code calling their own deprecated API), so nothing else is hidden.
"""

from __future__ import annotations

import os
import sys
import warnings

ENV = {
    "HF_HUB_OFFLINE": "1",  # nothing is fetched from a hub at run time
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # transformers draws a "Loading weights" bar on every model load; in a pipeline step it lands in
    # the dashboard as ERROR rows (stderr). tapper reports its own progress (tapper.progress).
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}

# (category, message regex) of warnings raised inside pinned dependencies by their own calls.
KNOWN_WARNINGS = [
    # peft 0.21 asks transformers 5.x for the old name while enabling gradient checkpointing.
    (FutureWarning, r".*is_gradient_checkpointing.* is deprecated"),
]


def quiet() -> None:
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    if "transformers" in sys.modules:  # imported before the environment was set
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
