"""Every shipped config loads into tapper's dataclass configs (unknown keys are errors), so a renamed
setting cannot leave a config under configs/ that fails only when someone runs it."""
from pathlib import Path

import pytest
import yaml

from tapper.config import load_run_config
from tapper.online.config import load_online_config
from tapper.presets import PRESET_DIR, PRESETS, preset_for

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 10


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    data = yaml.safe_load(path.read_text()) or {}
    if "parameters" in data:  # ZenML run config: parameters.run is tapper's RunConfig
        params = data["parameters"]
        cfg = load_run_config(params.get("run", {}))
        if "online" in params:
            _, online = load_online_config({**params.get("run", {}), "online": params["online"]})
            assert online.chunks >= 1
    else:  # a `tapper experiment` preset: the RunConfig itself
        cfg = load_run_config(data)
    assert cfg.stage2.epochs >= 1


def test_each_backbone_preset_is_a_file_and_loads():
    for backbone, name in PRESETS.items():
        data, path = preset_for(backbone)
        assert path == PRESET_DIR / name and data
        load_run_config(data)
    assert preset_for("no-such-backbone") == ({}, None)
