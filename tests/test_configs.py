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


def test_help_config_lists_every_set_key_with_its_default_and_meaning(capsys):
    import dataclasses

    from tapper.cli import main
    from tapper.config import RunConfig, config_keys

    keys = config_keys()
    assert all(meaning for _, _, meaning in keys)

    # every leaf of the config tree, nothing else
    def leaves(d, prefix=""):
        for k, v in d.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]

    assert [k for k, _, _ in keys] == list(leaves(dataclasses.asdict(RunConfig())))
    with pytest.raises(SystemExit) as done:
        main(["experiment", "--help-config"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for key, _, meaning in keys:
        assert f"  {key} = " in out and meaning in out
    assert "stage2.din_score_bound = null" in out and "stage2.prefix_len = 8" in out
    # and each listed key is one --set accepts
    load_run_config({}, [f"{k}={v}" for k, v in [("stage2.din_score_bound", 2.0), ("stage1.max_examples", 10)]])
