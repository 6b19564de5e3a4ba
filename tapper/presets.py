"""Tested run settings for `tapper experiment`, one per CPU backbone.

The RunConfig defaults are the paper's (Tables 4-5: LoRA Stage 1, lr 1e-4,
3 epochs, 100 Stage-2 users), sized for an 8B model on a GPU. On a CPU they
are wrong both ways: the tiny random Llama cannot learn the task through a
LoRA on frozen random weights, and SmolLM2 at the paper's budget takes hours.
So `tapper experiment` without `--config` starts from the preset of its
backbone when there is one; `--config` and `--set` apply on top. The presets
are also in configs/ (experiment-tiny.yaml, experiment-smollm2-cpu.yaml).
"""

from __future__ import annotations

from pathlib import Path

import yaml

PRESET_DIR = Path(__file__).resolve().parent / "resources" / "presets"
PRESETS = {"tiny": "experiment-tiny.yaml", "smollm2": "experiment-smollm2-cpu.yaml"}


def preset_for(backbone: str) -> tuple[dict, Path | None]:
    """(settings, file) of the backbone's preset; ({}, None) for a backbone without one."""
    name = PRESETS.get(backbone)
    if name is None:
        return {}, None
    path = PRESET_DIR / name
    return yaml.safe_load(path.read_text()) or {}, path
