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
# Backbone precisions (tapper.precision): trainable tensors (LoRAs, prefix encoder, user table) stay fp32 in every one.
DTYPES = ("fp32", "bf16", "fp16")


def _check_schedule(obj: Any) -> None:
    if obj.schedule not in SCHEDULES:
        raise ConfigError(f"{type(obj).__name__}.schedule must be one of {list(SCHEDULES)}, got {obj.schedule!r}")
    if not 0 <= obj.warmup < 1:
        raise ConfigError(f"{type(obj).__name__}.warmup must be in [0, 1), got {obj.warmup!r}")


def _check_memory(obj: Any) -> None:
    """The precision and memory settings every trained stage shares (dtype, gradient_checkpointing,
    micro_batch_size)."""
    if obj.dtype not in DTYPES:
        raise ConfigError(f"{type(obj).__name__}.dtype must be one of {list(DTYPES)}, got {obj.dtype!r}")
    mb = obj.micro_batch_size
    if mb is not None and (mb <= 0 or mb > obj.batch_size):
        raise ConfigError(
            f"{type(obj).__name__}.micro_batch_size must be in [1, batch_size={obj.batch_size}], got {mb!r}"
        )


def _check_positive(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if v is not None and v <= 0:
            raise ConfigError(f"{type(obj).__name__}.{n} must be > 0, got {v!r}")


def knob(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING) -> Any:
    """A config field with its meaning: `tapper experiment --help-config` prints it with the default."""
    if not help:
        raise TypeError("every config field says what it means")
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _qkvo() -> list[str]:
    return ["q_proj", "k_proj", "v_proj", "o_proj"]


# Shared by both trained stages (tapper.precision, tapper.train.loop).
_DTYPE_HELP = (
    "precision of the frozen backbone: fp32, bf16, or fp16 (with loss scaling, for GPUs without bf16); "
    "what trains keeps fp32 weights and optimizer state in every case"
)
_CHECKPOINT_HELP = "recompute each transformer block in the backward pass instead of keeping its activations"
_MICRO_HELP = (
    "examples per forward/backward; the gradients of batch_size / micro_batch_size micro-batches make "
    "one optimizer step, the same step within rounding (null = the whole batch at once)"
)
_WARMUP_HELP = "linear warm-up over this share of the optimizer steps"
_SCHEDULE_HELP = "learning rate after warm-up: constant, or linear decay to 0"


@dataclass
class Stage1Config:
    """Task LoRA on q,k,v,o, trained on the Stage-1 users, then merged (paper 2.1, Table 4)."""

    lora_r: int = knob(8, "rank of the task LoRA")
    lora_alpha: int = knob(8, "LoRA scaling alpha (the update is scaled by alpha / r)")
    lora_dropout: float = knob(0.05, "dropout on the LoRA input")
    target_modules: list[str] = knob(help="projections the task LoRA adapts", factory=_qkvo)
    epochs: float = knob(3, "passes over the Stage-1 training examples (fractions allowed)")
    lr: float = knob(3e-4, "learning rate")
    batch_size: int = knob(8, "examples per optimizer step")
    max_len: int = knob(256, "tokens per example (prompt + answer), longer prompts cut from the left")
    max_examples: int | None = knob(None, "cap on Stage-1 training examples (null = all); keeps CPU runs short")
    skip: bool = knob(False, "skip Stage 1 entirely and use the backbone as it is (ablations)")
    # Full mode exists because a LoRA on frozen *random* weights cannot learn the task format.
    mode: str = knob(
        "lora",
        "lora: the paper's task LoRA, merged; full: train every weight but the input "
        "embeddings (the cached vectors depend on them), for random-init test backbones only",
    )
    warmup: float = knob(0.0, _WARMUP_HELP)
    schedule: str = knob("constant", _SCHEDULE_HELP)
    dtype: str = knob("fp32", _DTYPE_HELP)
    gradient_checkpointing: bool = knob(False, _CHECKPOINT_HELP)
    micro_batch_size: int | None = knob(None, _MICRO_HELP)

    def __post_init__(self) -> None:
        _check_positive(self, "lora_r", "lora_alpha", "epochs", "lr", "batch_size", "max_len", "max_examples")
        if self.mode not in ("lora", "full"):
            raise ConfigError(f"Stage1Config.mode must be 'lora' or 'full', got {self.mode!r}")
        _check_schedule(self)
        _check_memory(self)
        if self.mode == "full" and self.dtype != "fp32":
            # Full mode trains the backbone's own weights: in bf16/fp16 their updates would be rounded away.
            raise ConfigError(
                f"Stage1Config: mode 'full' trains the backbone's weights and needs dtype fp32, got {self.dtype!r}"
            )


@dataclass
class Stage2Config:
    """Prefix learning with the bridge LoRA on the frozen merged backbone (paper 2.2, Table 5)."""

    prefix_len: int = knob(8, "L: soft tokens in the prefix (P_u and P_q each have L x d numbers)")
    bridge_r: int = knob(4, "rank of the bridge LoRA that lets the merged backbone read the prefix")
    bridge_alpha: int = knob(8, "bridge LoRA scaling alpha")
    bridge_dropout: float = knob(0.05, "dropout on the bridge LoRA input")
    target_modules: list[str] = knob(help="projections the bridge LoRA adapts", factory=_qkvo)
    din_hidden: int | None = knob(None, "hidden width of the DIN attention scorer (null = the backbone's d)")
    proj_hidden: int | None = knob(None, "hidden width of the MLP that maps the pooled history to P_q (null = d)")
    epochs: float = knob(3, "passes over the Stage-2 training examples")
    lr: float = knob(1e-4, "learning rate of the shared prefix network and the bridge")
    # λ_t, λ_o barely move at the shared rate (docs/design.md), so they get their own.
    lambda_lr: float = knob(3e-2, "learning rate of the temporal decays λ_t and λ_o")
    lambda_init: float = knob(0.1, "initial λ_t and λ_o")
    # Each row sees only its user's examples, so with few examples per user it may need a larger rate.
    user_lr: float | None = knob(None, "learning rate of the user table E (null = lr)")
    # A row has L*d numbers for a few dozen examples and can memorize their answers; decay pulls it toward P_q.
    user_weight_decay: float = knob(0.0, "decoupled weight decay on the user table only")
    user_init_std: float = knob(
        1.0,
        "std of the user table's initial rows, in units of the token-embedding std "
        "(0.1 keeps the prefix close to P_q early on)",
    )
    batch_size: int = knob(16, "examples per optimizer step")
    max_len: int = knob(256, "tokens per example after the prefix")
    max_examples_per_user: int | None = knob(
        None, "train on at most this many of each user's most recent history items (null = all)"
    )
    use_bridge: bool = knob(True, "ablation switch: the bridge LoRA")
    use_pq: bool = knob(True, "ablation switch: the query-conditioned prefix P_q")
    use_pu: bool = knob(True, "ablation switch: the per-user prefix P_u (false: P_q only, serves unseen users)")
    use_lambda_t: bool = knob(True, "ablation switch: time decay λ_t in the attention")
    use_lambda_o: bool = knob(True, "ablation switch: order decay λ_o in the attention")
    bm25_k: int | None = knob(
        None, "BM25 pre-filter: keep only the k history records most similar to the query (null = all)"
    )
    # Unbounded scores learn to put ~90 % of α on one record, leaving P_q a copy of one record (docs/results/core.md).
    din_score_bound: float | None = knob(
        None,
        "bound b on the DIN content score before the temporal terms, "
        "s = b·tanh(s/b) (null = unbounded, as in the paper)",
    )
    input_norm: str = knob(
        "standardize",
        "how record, query and pooled vectors enter the MLPs: standardize "
        "(centred on the training corpus) or unit_rms (each vector alone, the paper)",
    )
    history_dropout: float = knob(0.0, "training only: each history record is hidden from P_q with this probability")
    warmup: float = knob(0.0, _WARMUP_HELP)
    schedule: str = knob("constant", _SCHEDULE_HELP)
    bridge_scope: str = knob(
        "all",
        "where the bridge LoRA acts: all positions (the paper) or only the prefix's "
        "(it then changes how the prefix is read, not how the prompt is processed)",
    )
    validation_share: float = knob(
        0.0,
        "share of the Stage-2 examples held out (seeded) to choose the epoch kept; "
        "0 = train on all and keep the last (the paper)",
    )
    aux_weight: float = knob(
        0.0,
        "weight of an auxiliary loss: a linear readout of the pooled history predicts "
        "the answer (classification tasks); 0 = the paper's loss alone",
    )
    dtype: str = knob("fp32", _DTYPE_HELP)
    gradient_checkpointing: bool = knob(False, _CHECKPOINT_HELP)
    micro_batch_size: int | None = knob(None, _MICRO_HELP)

    def __post_init__(self) -> None:
        if self.bridge_scope not in ("all", "prefix"):
            raise ConfigError(f"Stage2Config.bridge_scope must be 'all' or 'prefix', got {self.bridge_scope!r}")
        _check_positive(
            self,
            "prefix_len",
            "bridge_r",
            "bridge_alpha",
            "din_hidden",
            "proj_hidden",
            "epochs",
            "lr",
            "lambda_lr",
            "batch_size",
            "max_len",
            "max_examples_per_user",
            "bm25_k",
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
        _check_memory(self)


@dataclass
class EvalConfig:
    batch_size: int = knob(16, "queries per generation batch")
    max_new_tokens: int | None = knob(
        None, "answer tokens generated (null = per task kind: a few for labels, more for headlines)"
    )
    dtype: str = knob("fp32", "precision the non-personalized base generates in (TAP-PER uses its Stage-2 dtype)")

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"EvalConfig.dtype must be one of {list(DTYPES)}, got {self.dtype!r}")


@dataclass
class RunConfig:
    stage1: Stage1Config = knob(help="Stage 1: the task LoRA", factory=Stage1Config)
    stage2: Stage2Config = knob(help="Stage 2: prefixes and the bridge", factory=Stage2Config)
    eval: EvalConfig = knob(help="evaluation", factory=EvalConfig)
    stage2_users: int = knob(100, "the N most active users: trained in Stage 2 and evaluated")
    seed: int = knob(0, "seed of the split, initialisation and data order")
    # The paper gives OPPU TAP-PER's own targets (q, k, v, o); OPPU's code used [q_proj, v_proj].
    oppu_targets: list[str] = knob(help="projections of OPPU's per-user LoRAs", factory=_qkvo)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def config_keys(cls: type = None, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(--set key, default, meaning) of every setting under `cls` (default RunConfig), nested sections flattened."""
    cls = cls or RunConfig
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            out += config_keys(hints[f.name], key + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append((key, default, f.metadata.get("help", "")))
    return out


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
