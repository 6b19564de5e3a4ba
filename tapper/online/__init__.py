"""Online adaptation to streaming feedback (paper 4.6): the update the serving stack calls on
feedback, and the simulation that compares Static / Online-Emb / Online-Full / Full-Retrain.

    update_users(model, task, tokenizer, cache, new_examples, mode="emb"|"full", ...) -> UpdateReport
    run_online(task, questions, outputs, backbone, out_dir, run_cfg, online_cfg) -> trajectories dict

The names below are imported on first use (PEP 562), so `tapper.online.cli` (and with it
`tapper --help`) does not pull in torch and transformers.
"""

from __future__ import annotations

import importlib
import sys
import types

_WHERE = {
    "METHODS": "config",
    "OnlineConfig": "config",
    "load_online_config": "config",
    "plot_trajectories": "plot",
    "OnlineSplit": "simulate",
    "Trajectory": "simulate",
    "UserStream": "simulate",
    "run_online": "simulate",
    "simulate": "simulate",
    "simulate_method": "simulate",
    "split_chunks": "simulate",
    "stream_split": "simulate",
    "train_bootstrap": "simulate",
    "trajectories_report": "simulate",
    "UpdateReport": "update",
    "add_users": "update",
    "feedback_examples": "update",
    "update_users": "update",
}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'tapper.online' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"tapper.online.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """`tapper.online.simulate` is the function, as it was when this file imported everything: importing the
    submodule of the same name would otherwise rebind the package attribute to the module."""

    @property
    def simulate(self):
        from tapper.online.simulate import simulate

        return simulate

    @simulate.setter
    def simulate(self, value) -> None:
        pass


sys.modules[__name__].__class__ = _Package
