"""`OnlineConfig`: the knobs of the streaming-feedback simulation (paper 4.6), and how a YAML /
`--set` override splits into the run config and the `online:` section.

    tapper online ... --set online.chunks=5 --set online.epochs=2 --set stage2.epochs=6

Unknown keys are errors, as everywhere in tapper.config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from tapper.config import ConfigError, RunConfig, _check_positive, apply_overrides, from_dict

METHODS = ("static", "online-emb", "online-full", "full-retrain")
EVAL_HISTORIES = ("absorbed", "full")


@dataclass
class OnlineConfig:
    """Streaming-feedback simulation: T chunks, one SGD budget for every updating method."""

    # T: the later half of each evaluation user's history arrives in this many equal chunks.
    chunks: int = 5
    # SGD budget per chunk, identical for online-emb and online-full: passes over the
    # chunk's examples (fractions allowed) ...
    epochs: float = 1.0
    # ... or, when set, exactly this many optimizer steps per chunk (overrides `epochs`).
    steps: int | None = None
    # Learning rates; None = Stage 2's own (stage2.lr / stage2.lambda_lr), i.e. Stage 2 continued.
    lr_emb: float | None = None  # online-emb: the affected users' rows of the user table
    lr_full: float | None = None  # online-full: those rows + DIN/projection + bridge LoRA
    lambda_lr: float | None = None  # online-full: λ_t, λ_o
    # Batch size of the online updates; None = stage2.batch_size.
    batch_size: int | None = None
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    # Which history an evaluation query's P_q attends over at step t:
    #   absorbed  the records the method has absorbed so far (bootstrap half + chunks 1..t;
    #             Static absorbs nothing, so it keeps the bootstrap half and stays flat);
    #   full      the query's whole LaMP profile at every step (what the paper's unchanged
    #             test set literally holds; then the records of future chunks are visible
    #             to P_q before the model has trained on them).
    eval_history: str = "absorbed"
    # Seed of the online updates (shuffling, dropout); None = the run's seed.
    seed: int | None = None

    def __post_init__(self) -> None:
        _check_positive(self, "chunks", "epochs", "steps", "lr_emb", "lr_full", "lambda_lr", "batch_size")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ConfigError(
                f"OnlineConfig.methods: unknown {bad} (valid: {list(METHODS)})"
                if bad
                else "OnlineConfig.methods: empty"
            )
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"OnlineConfig.methods: duplicates in {self.methods}")
        if self.eval_history not in EVAL_HISTORIES:
            raise ConfigError(
                f"OnlineConfig.eval_history must be one of {list(EVAL_HISTORIES)}, got {self.eval_history!r}"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_online_config(data: dict | None = None, overrides: list[str] | None = None) -> tuple[RunConfig, OnlineConfig]:
    """Split one config dict (YAML) + `key=value` overrides into (RunConfig, OnlineConfig).

    The run settings stay at the top level (stage1/stage2/eval/stage2_users/seed), the
    simulation's under `online:`; `--set online.chunks=3` and `--set stage2.lr=1e-3` both work.
    """
    merged = apply_overrides(data or {}, overrides or [])
    online = merged.pop("online", None) or {}
    if not isinstance(online, dict):
        raise ConfigError(f"online: expected a section of keys, got {online!r}")
    return from_dict(RunConfig, merged, "run config"), from_dict(OnlineConfig, online, "online")
