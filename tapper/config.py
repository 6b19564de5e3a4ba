"""Run configuration: dataclasses that reject unknown keys, plus `key=value` overrides.

Every knob of both stages and of evaluation lives here, so a YAML file, the
CLI's `--set stage2.epochs=6` and a ZenML step parameter all mean the same.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(ValueError):
    pass


SCHEDULES = ("constant", "linear")


def _check_schedule(obj: Any) -> None:
    if obj.schedule not in SCHEDULES:
        raise ConfigError(f"{type(obj).__name__}.schedule must be one of {list(SCHEDULES)}, got {obj.schedule!r}")
    if not 0 <= obj.warmup < 1:
        raise ConfigError(f"{type(obj).__name__}.warmup must be in [0, 1), got {obj.warmup!r}")


def _check_positive(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if v is not None and v <= 0:
            raise ConfigError(f"{type(obj).__name__}.{n} must be > 0, got {v!r}")


@dataclass
class Stage1Config:
    """Task LoRA on q,k,v,o, trained on the Stage-1 users, then merged (paper 2.1, Table 4)."""

    lora_r: int = 8
    lora_alpha: int = 8
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    epochs: float = 3
    lr: float = 3e-4
    batch_size: int = 8
    max_len: int = 256
    # Cap on Stage-1 training examples (None = all); keeps CPU runs short.
    max_examples: int | None = None
    # Skip Stage 1 entirely (the backbone is used as it is); for ablations.
    skip: bool = False
    # "lora": the paper's task LoRA, merged. "full": train every weight but the input
    # embeddings (which the cached vectors depend on) — only for randomly initialised
    # test backbones, where a LoRA on frozen random weights cannot learn the task format.
    mode: str = "lora"
    # Learning-rate schedule: linear warm-up over this share of the steps, then "constant" or "linear" decay to 0.
    warmup: float = 0.0
    schedule: str = "constant"

    def __post_init__(self) -> None:
        _check_positive(self, "lora_r", "lora_alpha", "epochs", "lr", "batch_size", "max_len", "max_examples")
        if self.mode not in ("lora", "full"):
            raise ConfigError(f"Stage1Config.mode must be 'lora' or 'full', got {self.mode!r}")
        _check_schedule(self)


@dataclass
class Stage2Config:
    """Prefix learning with the bridge LoRA on the frozen merged backbone (paper 2.2, Table 5)."""

    prefix_len: int = 8
    bridge_r: int = 4
    bridge_alpha: int = 8
    bridge_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # Hidden widths of the DIN scorer and the projection MLP (None = the backbone's d).
    din_hidden: int | None = None
    proj_hidden: int | None = None
    epochs: float = 3
    lr: float = 1e-4
    # λ_t, λ_o barely move at the shared rate (DESIGN.md, prototype), so they get their own.
    lambda_lr: float = 3e-2
    lambda_init: float = 0.1
    # Learning rate of the user table (None = lr). Each row sees only its user's examples,
    # so with few examples per user it may need a larger rate than the shared network.
    user_lr: float | None = None
    # Decoupled weight decay on the user table only: a row has L*d numbers for a few dozen
    # examples and can memorize their answers; decay pulls it toward the shared P_q path.
    user_weight_decay: float = 0.0
    # Std of the user table's initial rows, in units of the token-embedding std. Rows
    # start as random token-sized vectors (1.0); a small start (0.1) keeps the prefix
    # close to P_q early on, which generalized better on the synthetic check.
    user_init_std: float = 1.0
    batch_size: int = 16
    max_len: int = 256
    # Train on at most this many of each user's most recent history items (None = all).
    max_examples_per_user: int | None = None
    # Ablation switches: one model, several switches (DESIGN.md).
    use_bridge: bool = True
    use_pq: bool = True
    use_pu: bool = True
    use_lambda_t: bool = True
    use_lambda_o: bool = True
    # BM25 pre-filter: keep only the k history records most similar to the query (None = all).
    bm25_k: int | None = None
    # Bound on the DIN content score before the temporal terms: s = b·tanh(s/b). None = unbounded,
    # as in the paper. Unbounded scores learn to put ~90 % of α on one record (see README), which
    # leaves P_q a copy of one record and the λ terms nothing to shape; a bound keeps α a weighting.
    din_score_bound: float | None = None
    # How record, query and pooled vectors enter the MLPs (tapper.model.prefix): "standardize"
    # (centred on the training corpus, pooled history scaled per dimension) or "unit_rms" (each
    # vector scaled alone, as before; the users' pooled histories then differ in ~2 % of their energy).
    input_norm: str = "standardize"
    # Training only: each history record is hidden from P_q with this probability at each step.
    history_dropout: float = 0.0
    warmup: float = 0.0
    schedule: str = "constant"
    # Where the bridge LoRA acts: "all" positions (the paper) or only the soft tokens' ("prefix"): it can then
    # change how the prefix is read, layer by layer, but not how the prompt is processed.
    bridge_scope: str = "all"
    # Share of the Stage-2 training examples held out (seeded) to choose the epoch whose state is kept; 0 = train
    # on all of them for `epochs` and keep the last state (the paper).
    validation_share: float = 0.0
    # Weight of an auxiliary loss: a linear readout of the attention-pooled history predicts the example's answer
    # (classification tasks; tapper.train.stage2.AnswerReadout). 0 = the paper's loss alone.
    aux_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.bridge_scope not in ("all", "prefix"):
            raise ConfigError(f"Stage2Config.bridge_scope must be 'all' or 'prefix', got {self.bridge_scope!r}")
        _check_positive(
            self, "prefix_len", "bridge_r", "bridge_alpha", "din_hidden", "proj_hidden",
            "epochs", "lr", "lambda_lr", "batch_size", "max_len", "max_examples_per_user", "bm25_k",
            "din_score_bound",
        )
        if self.user_init_std < 0:
            raise ConfigError(f"Stage2Config.user_init_std must be >= 0, got {self.user_init_std!r}")
        _check_schedule(self)
        if self.aux_weight < 0:
            raise ConfigError(f"Stage2Config.aux_weight must be >= 0, got {self.aux_weight!r}")
        if not 0 <= self.validation_share < 1:
            raise ConfigError(f"Stage2Config.validation_share must be in [0, 1), got {self.validation_share!r}")
        if not 0 <= self.history_dropout < 1:
            raise ConfigError(f"Stage2Config.history_dropout must be in [0, 1), got {self.history_dropout!r}")
        if self.input_norm not in ("standardize", "unit_rms"):
            raise ConfigError(f"Stage2Config.input_norm must be 'standardize' or 'unit_rms', got {self.input_norm!r}")
        if not (self.use_pq or self.use_pu):
            raise ConfigError("Stage2Config: use_pq and use_pu cannot both be false (there would be no prefix)")


@dataclass
class EvalConfig:
    batch_size: int = 16
    # None = per task kind: a few tokens for labels, more for headlines.
    max_new_tokens: int | None = None


@dataclass
class RunConfig:
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    eval: EvalConfig = field(default_factory=EvalConfig)
    stage2_users: int = 100
    seed: int = 0
    # OPPU's per-user LoRA targets: the paper gives OPPU TAP-PER's own (q, k, v, o); OPPU's code used [q_proj, v_proj].
    oppu_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def from_dict(cls: type, data: dict | None, where: str = "config") -> Any:
    """Build dataclass `cls` from a dict, recursing into nested dataclasses; unknown keys are errors."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    kwargs = {}
    for k, v in data.items():
        t = hints[k]
        if dataclasses.is_dataclass(t):
            kwargs[k] = from_dict(t, v, f"{where}.{k}")
        else:
            kwargs[k] = v
    return cls(**kwargs)


def _coerce(text: str) -> Any:
    """`--set` values are YAML scalars: 6, 1e-3, true, null, [a, b]."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        # YAML 1.1 reads `1e-3` (no dot) as a string; people mean a number.
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(cfg_dict: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` overrides to a nested dict (validated later by from_dict)."""
    out = _deepcopy(cfg_dict)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. stage2.epochs=6")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p!r} is not a section")
        node[parts[-1]] = _coerce(value)
    return out


def _deepcopy(d: dict) -> dict:
    return {k: _deepcopy(v) if isinstance(v, dict) else v for k, v in d.items()}


def load_run_config(data: dict | None = None, overrides: list[str] | None = None) -> RunConfig:
    return from_dict(RunConfig, apply_overrides(data or {}, overrides or []), "run config")
