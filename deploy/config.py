"""The server's settings: one dataclass per concern, unknown keys refused, every value checked at start.

Settings come from flags (deploy.serve) over the environment (`ServeConfig.from_env`); the names are in
deploy/README.md. A value that makes no sense (a negative limit, an unknown mode) stops the server at start,
naming the setting, rather than surfacing as odd behaviour under traffic.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from tapper.config import ConfigError, from_dict

MODES = ("tapper", "base", "rag")
# A token shorter than this is refused at start: a guessable token is no better than none.
MIN_TOKEN_CHARS = 16
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class Limits:
    """What one request may hold. Every limit is checked before any model work, and a request over it gets a 4xx
    naming the field, with nothing stored."""

    # Bytes of request body; larger bodies are refused (413) from Content-Length before they are read, or as soon
    # as the streamed body passes the limit.
    max_body_bytes: int = 1 << 20
    # Characters of any one text: the query input, each field of a record (a LaMP article is ~5k characters).
    max_text_chars: int = 16_000
    # Characters of a user id or record id.
    max_id_chars: int = 256
    # Records a /predict may send as extra history; records one /feedback may add.
    max_request_history: int = 256
    max_feedback_records: int = 64
    # Records a user's stored history may reach: each prediction attends over the whole history, so an unbounded
    # one makes that user's predictions ever slower. A feedback past it is a 409.
    max_stored_history: int = 10_000
    # Feedback dates may lie at most this many days after the server's today (UTC). One far-future date would make
    # every later real feedback of that user a 409 (records must come in time order).
    max_future_days: int = 1
    # Generated tokens a request may ask for.
    max_new_tokens: int = 256
    # HTTP requests in progress at once in this process; beyond it 503 with Retry-After (health and metrics are
    # never refused).
    max_inflight: int = 256

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if (
                not isinstance(value, int)
                or isinstance(value, bool)
                or value < (0 if f.name == "max_future_days" else 1)
            ):
                raise ConfigError(f"limits.{f.name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class Batching:
    """How concurrent predictions are gathered into one forward pass (deploy.batcher)."""

    # Rows in one batch. Larger batches raise throughput until the CPU/GPU is saturated, and every row of a batch
    # waits for the longest generation in it.
    max_batch: int = 8
    # How long the first request of a batch waits for more to arrive (ms). Only paid when the server is idle
    # enough that a batch is not already waiting: under load the queue holds the next batch already.
    max_wait_ms: float = 5.0
    # Predictions waiting for a batch; when full, new ones get 503 with Retry-After instead of queueing without bound.
    max_queue: int = 64
    # Seconds a 503 asks the client to wait.
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1 or self.retry_after_s < 0 or not (0 <= self.max_wait_ms <= 1000):
            raise ConfigError(
                f"batching: max_batch and max_queue must be >= 1, max_wait_ms in [0, 1000], "
                f"retry_after_s >= 0; got {self}"
            )


@dataclass(frozen=True)
class Auth:
    """Bearer tokens. `api_tokens` open prediction, feedback and the per-user endpoints; `admin_tokens` also
    /reload and the user list of /info. Several tokens each (comma-separated in the environment) let a token be
    rotated without downtime. With none configured the server refuses to start unless `insecure_local` is set,
    which in turn only binds to loopback."""

    api_tokens: tuple[str, ...] = field(default=(), repr=False)
    admin_tokens: tuple[str, ...] = field(default=(), repr=False)
    insecure_local: bool = False

    def __post_init__(self) -> None:
        for kind in ("api_tokens", "admin_tokens"):
            for token in getattr(self, kind):
                if len(token) < MIN_TOKEN_CHARS or not token.isascii() or not token.isprintable() or " " in token:
                    raise ConfigError(
                        f"auth.{kind}: a token must be at least {MIN_TOKEN_CHARS} printable ASCII "
                        "characters without spaces"
                    )

    @property
    def open(self) -> bool:
        """No token checks at all (only with insecure_local)."""
        return self.insecure_local and not (self.api_tokens or self.admin_tokens)

    def check_startable(self, host: str | None = None) -> None:
        """Fail closed: refuse to start without tokens, unless insecure_local on a loopback address."""
        if self.insecure_local:
            if host is not None and host not in LOOPBACK_HOSTS:
                raise ConfigError(
                    f"--insecure-local serves without tokens and only binds to loopback; got --host {host}"
                )
            return
        missing = [
            name
            for name, tokens in (("TAPPER_API_TOKEN", self.api_tokens), ("TAPPER_ADMIN_TOKEN", self.admin_tokens))
            if not tokens
        ]
        if missing:
            raise ConfigError(
                f"refusing to start without {' and '.join(missing)}: every endpoint that changes state or "
                "reveals a user needs a token. Set them (the Kubernetes Secret tapper-serve-tokens), or "
                "pass --insecure-local to serve on loopback without tokens"
            )


@dataclass
class ServeConfig:
    model_dir: Path
    # Where feedback state lives (default: <model_dir>/live). Must be writable; shared by replicas if RWX.
    state_dir: Path | None = None
    # What answers a prediction: "tapper" (the prefix; the default), "base" (the bare Stage-1 backbone, no
    # prefix and no bridge) or "rag" (the Stage-1 backbone with the user's rag_k most relevant records written
    # into the prompt, as LaMP's RAG). The last two are for A/B comparisons and benchmarks on the same server.
    mode: str = "tapper"
    rag_k: int = 4
    # Predictions run with the bridge LoRA merged into a private copy of the weights it adapts (faster, exact up to
    # float rounding; one copy of those weights in memory: deploy.loaded.merged_lm). False: unmerged.
    merge_bridge: bool = True
    # Online-Emb budget per feedback request: `feedback_steps` optimizer steps if set, else epochs over its examples.
    feedback_epochs: float = 1.0
    feedback_steps: int | None = None
    feedback_lr: float | None = None  # default: the model's Stage-2 lr
    # How much lower the CPU priority of feedback training is than predictions' (nice increment of the trainer
    # thread, Linux; 0: the same). Predictions then win the cores when both want them (deploy.trainer).
    feedback_nice: int = 10
    max_new_tokens: int | None = None  # default: per task kind
    # Check that stage1/ hashes to the backbone the TapPer state was trained on (one pass over the weights).
    verify_backbone: bool = True
    keep_generations: int = 3
    # Replicas sharing the state directory pick up each other's feedback within this many seconds (a background
    # thread reads new journal entries; predictions never do disk I/O).
    sync_seconds: float = 2.0
    # Write the whole state as a new snapshot generation after this many feedback deltas (bounds replay at load).
    compact_every: int = 1000
    # A failed compaction is retried after this many seconds, doubling per failure up to compact_backoff_max_s.
    compact_backoff_s: float = 5.0
    compact_backoff_max_s: float = 600.0
    # Opt-in: keep per-user state in unlinked scratch files here instead of anonymous memory: the user table in a
    # shared mapping (page cache, evictable, only rows in use resident; tapper.model.paged_table) and the history
    # stores' unread lines in spool files (deploy.histories). Must be on a local disk (tapper.scratch), never the
    # shared state volume; each replica its own. Created if missing. None: both in memory.
    scratch_dir: Path | None = None
    limits: Limits = field(default_factory=Limits)
    batching: Batching = field(default_factory=Batching)
    auth: Auth = field(default_factory=Auth)

    def __post_init__(self) -> None:
        self.model_dir = Path(self.model_dir)
        self.state_dir = Path(self.state_dir) if self.state_dir else self.model_dir / "live"
        self.scratch_dir = Path(self.scratch_dir) if self.scratch_dir else None
        for name, cls in (("limits", Limits), ("batching", Batching), ("auth", Auth)):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                setattr(self, name, from_dict(cls, dict(value), name))
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.rag_k < 1:
            raise ConfigError("rag_k must be >= 1")
        if self.feedback_steps is not None and self.feedback_steps <= 0:
            raise ConfigError("feedback_steps must be > 0")
        if self.feedback_epochs <= 0:
            raise ConfigError("feedback_epochs must be > 0")
        if not 0 <= self.feedback_nice <= 19:
            raise ConfigError("feedback_nice must be in [0, 19]")
        if self.compact_every < 1:
            raise ConfigError("compact_every must be >= 1")
        if self.keep_generations < 2:
            # The previous generation stays while replicas that were reading it catch up.
            raise ConfigError("keep_generations must be >= 2")
        if self.sync_seconds < 0 or self.compact_backoff_s <= 0 or self.compact_backoff_max_s < self.compact_backoff_s:
            raise ConfigError("sync_seconds must be >= 0 and 0 < compact_backoff_s <= compact_backoff_max_s")
        if self.max_new_tokens is not None and not (1 <= self.max_new_tokens <= self.limits.max_new_tokens):
            raise ConfigError(f"max_new_tokens must be in [1, limits.max_new_tokens={self.limits.max_new_tokens}]")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "serve config") -> "ServeConfig":
        return from_dict(cls, dict(data), where)

    @classmethod
    def from_env(cls, **overrides) -> "ServeConfig":
        """Settings from the environment, `overrides` (flags; None = not given) winning."""
        env = os.environ
        model_dir = overrides.pop("model_dir", None) or env.get("TAPPER_MODEL_DIR")
        if not model_dir:
            raise ValueError("no model bundle: set TAPPER_MODEL_DIR or pass --model-dir")

        def num(name: str, kind=int):
            return kind(env[name]) if env.get(name) else None

        kw = dict(
            state_dir=env.get("TAPPER_STATE_DIR") or None,
            mode=env.get("TAPPER_MODE") or None,
            rag_k=num("TAPPER_RAG_K"),
            feedback_epochs=num("TAPPER_FEEDBACK_EPOCHS", float),
            feedback_steps=num("TAPPER_FEEDBACK_STEPS"),
            feedback_lr=num("TAPPER_FEEDBACK_LR", float),
            feedback_nice=num("TAPPER_FEEDBACK_NICE"),
            max_new_tokens=num("TAPPER_MAX_NEW_TOKENS"),
            verify_backbone=env.get("TAPPER_VERIFY_BACKBONE", "1").lower() not in ("0", "false", "no"),
            merge_bridge=env.get("TAPPER_MERGE_BRIDGE", "1").lower() not in ("0", "false", "no"),
            keep_generations=num("TAPPER_KEEP_GENERATIONS"),
            sync_seconds=num("TAPPER_SYNC_SECONDS", float),
            compact_every=num("TAPPER_COMPACT_EVERY"),
            scratch_dir=env.get("TAPPER_SCRATCH_DIR") or None,
        )
        kw = {k: v for k, v in kw.items() if v is not None}
        limits = {
            k: v
            for k, v in dict(
                max_body_bytes=num("TAPPER_MAX_BODY_BYTES"),
                max_text_chars=num("TAPPER_MAX_TEXT_CHARS"),
                max_request_history=num("TAPPER_MAX_REQUEST_HISTORY"),
                max_feedback_records=num("TAPPER_MAX_FEEDBACK_RECORDS"),
                max_stored_history=num("TAPPER_MAX_STORED_HISTORY"),
                max_future_days=num("TAPPER_MAX_FUTURE_DAYS"),
                max_inflight=num("TAPPER_MAX_INFLIGHT"),
            ).items()
            if v is not None
        }
        batching = {
            k: v
            for k, v in dict(
                max_batch=num("TAPPER_MAX_BATCH"),
                max_wait_ms=num("TAPPER_BATCH_WAIT_MS", float),
                max_queue=num("TAPPER_MAX_QUEUE"),
            ).items()
            if v is not None
        }
        auth = dict(
            api_tokens=_tokens(env.get("TAPPER_API_TOKEN")),
            admin_tokens=_tokens(env.get("TAPPER_ADMIN_TOKEN")),
            insecure_local=env.get("TAPPER_INSECURE_LOCAL", "0").lower() in ("1", "true", "yes"),
        )
        for name, group in (("limits", limits), ("batching", batching), ("auth", auth)):
            given = overrides.pop(name, None) or {}
            group.update({k: v for k, v in dict(given).items() if v is not None})
            kw[name] = group
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict({"model_dir": str(model_dir), **kw}, "serve settings")

    def with_auth(self, **changes) -> "ServeConfig":
        return replace(self, auth=replace(self.auth, **changes))


def _tokens(value: str | None) -> tuple[str, ...]:
    return tuple(t.strip() for t in (value or "").split(",") if t.strip())
