"""A backbone's transformers config without its weights, so a plan for an 8B model needs no download."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

# The published config.json numbers of the paper's backbones (hub ids as the GPU configs name them).
KNOWN = json.loads((Path(__file__).resolve().parents[1] / "resources" / "backbones.json").read_text())


def backbone_config(spec: str) -> PretrainedConfig:
    """`tiny`, `smollm2`, a hub id listed in tapper/resources/backbones.json, or a directory / cached hub id with a
    config.json."""
    if spec in KNOWN:
        data = dict(KNOWN[spec])
        return AutoConfig.for_model(data.pop("model_type"), **data)
    from tapper.analysis.footprint import backbone_config as footprint_config

    return footprint_config(spec)
