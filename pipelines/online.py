"""The `online_adaptation` pipeline (paper 4.6, Figure 6): Static, Online-Emb, Online-Full and
Full-Retrain on streaming feedback, from one bootstrap checkpoint.

files -> validated dataset -> splits -> cached vectors -> Stage 1   (the training pipeline's own
steps and parameters: served from the step cache after a training run with the same settings)
      -> online_bootstrap -> simulate_<method> (one step per method) -> online_report

`online` is tapper.online.OnlineConfig as a dict (chunks, epochs/steps, lr_emb, lr_full,
lambda_lr, batch_size, methods, eval_history, seed). See configs/online-tiny.yaml.
"""

from __future__ import annotations

from typing import Optional

from zenml import pipeline

from pipelines.training import _tracked, upstream
from steps import online_bootstrap, online_method, online_report


def step_id(method: str) -> str:
    return "simulate_" + method.replace("-", "_")


@pipeline(name="online_adaptation", enable_cache=True)
def online_adaptation(
    questions: str,
    outputs: str,
    task: Optional[str] = None,
    backbone: str = "smollm2",
    run: Optional[dict] = None,
    online: Optional[dict] = None,
    min_history: int = 1,
    max_history: int = 100_000,
) -> None:
    """Streaming-feedback simulation on LaMP files; `run` is tapper's RunConfig as a dict, `online` its OnlineConfig."""
    from tapper.online import OnlineConfig

    run = dict(run or {})
    online = dict(online or {})
    methods = OnlineConfig(**online).methods if online else OnlineConfig().methods
    data, vectors, stage1 = upstream(questions, outputs, task, backbone, run, min_history, max_history)
    boot_state, boot_metrics = _tracked(online_bootstrap)(stage1, data, vectors, run=run, online=online)
    trajectories = [
        _tracked(online_method)(
            m, stage1, boot_state, boot_metrics, data, vectors, run=run, online=online, id=step_id(m)
        )
        for m in methods
    ]
    _tracked(online_report)(trajectories, boot_metrics, stage1, data, backbone=backbone, run=run, online=online)
