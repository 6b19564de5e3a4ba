"""Online adaptation to streaming feedback (paper 4.6): the update the serving stack calls on
feedback, and the simulation that compares Static / Online-Emb / Online-Full / Full-Retrain.

    update_users(model, task, tokenizer, cache, new_examples, mode="emb"|"full", ...) -> UpdateReport
    run_online(task, questions, outputs, backbone, out_dir, run_cfg, online_cfg) -> trajectories dict
"""
from tapper.online.config import METHODS, OnlineConfig, load_online_config
from tapper.online.plot import plot_trajectories
from tapper.online.simulate import (
    OnlineSplit, Trajectory, UserStream, run_online, simulate, simulate_method, split_chunks, stream_split,
    train_bootstrap, trajectories_report,
)
from tapper.online.update import UpdateReport, add_users, feedback_examples, update_users

__all__ = [
    "METHODS", "OnlineConfig", "load_online_config", "plot_trajectories", "OnlineSplit", "Trajectory", "UserStream",
    "run_online", "simulate", "simulate_method", "split_chunks", "stream_split", "train_bootstrap",
    "trajectories_report", "UpdateReport", "add_users", "feedback_examples", "update_users",
]
