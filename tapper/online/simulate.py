"""Streaming-feedback simulation (paper 4.6, Figure 6): Static, Online-Emb, Online-Full and
Full-Retrain from one bootstrap checkpoint.

Protocol, as in the paper:
    - For each evaluation (Stage-2) user, the training history (chronological) is split in
      half: the earlier n//2 records bootstrap Stage 2; the later ones are cut into T equal
      chunks (sizes differ by at most one; contiguous, disjoint, in time order).
    - One bootstrap checkpoint is trained (Stage 2 on the bootstrap halves). Every method
      starts from it; R_0 is its score on the test set.
    - Chunk t (t = 1..T) arrives for every user at once; each method absorbs it and is scored
      on the unchanged test queries, giving R_0..R_T at fractions 0.5, 0.6, ..., 1.0.

Methods:
    static        no update.
    online-emb    `update_users(mode="emb")` on chunk t: only those users' rows of E.
    online-full   `update_users(mode="full")` on chunk t: rows + DIN/projection/λ's + bridge.
    full-retrain  Stage 2 from scratch on every record seen through chunk t (the upper bound);
                  its budget is the Stage-2 schedule on all that data, not the online budget.
Online-Emb and Online-Full get the same SGD budget per chunk (OnlineConfig.epochs or .steps).

Design decision — which history the test queries' P_q sees at step t (OnlineConfig.eval_history):
    `absorbed` (default): the records the method has absorbed so far, i.e. the bootstrap
    half plus chunks 1..t for the updating methods and Full-Retrain. Static absorbs nothing,
    so it keeps seeing the bootstrap half and its trajectory is exactly flat. A record is
    then never visible to P_q before it could have been trained on, as in a deployment where
    feedback reaches the record store and the model together. With `full`, every method
    sees the query's whole LaMP profile at every step (Static is then flat too). LaMP queries
    carry no date, so a query's date is its latest visible record's (docs/design.md): the time gaps
    are those "as of step t".
Stage 1 is trained once on the Stage-1 users only, so no method sees a later-half record
before its chunk.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tapper.atomic import atomic_write_json
from tapper.config import RunConfig
from tapper.data.chronology import sort_chronologically
from tapper.data.splits import record_examples
from tapper.data.types import Example, Record
from tapper.eval.paired import paired_difference
from tapper.eval.predict import generate_texts
from tapper.experiment import (
    PreparedData,
    embedding_cache,
    open_backbone,
    prepare_data,
    query_scores,
    run_stage1,
    score,
)
from tapper.model.backbone import load_backbone_dir
from tapper.model.tapper import TapPer
from tapper.online.config import OnlineConfig
from tapper.online.update import steps_for, update_users
from tapper.train.stage2 import encoder_for, train_stage2

StepLogger = Callable[[str, int, float, dict], None]  # (method, t, fraction absorbed, metrics)


# --- the stream ----------------------------------------------------------------------------


@dataclass
class UserStream:
    user_id: str
    bootstrap: list[Record]
    chunks: list[list[Record]]

    def absorbed(self, t: int) -> list[Record]:
        """Records seen after chunk t (t = 0: the bootstrap half), chronological."""
        return self.bootstrap + [r for c in self.chunks[:t] for r in c]


@dataclass
class OnlineSplit:
    """Every evaluation user's bootstrap half and T chunks, with the examples each step trains on."""

    task: object
    users: list[str]
    streams: dict[str, UserStream]
    n_chunks: int
    eval: list[Example]
    # examples[t]: the record-made examples of step t (t = 0: bootstrap), each seeing the records before it.
    examples: list[list[Example]] = field(default_factory=list)

    @property
    def fractions(self) -> list[float]:
        return [round(0.5 + 0.5 * t / self.n_chunks, 4) for t in range(self.n_chunks + 1)]

    def seen_examples(self, t: int) -> list[Example]:
        """All training examples absorbed through step t (Full-Retrain's data), per user in time order."""
        order = {u: i for i, u in enumerate(self.users)}
        out = [ex for s in range(t + 1) for ex in self.examples[s]]
        return sorted(out, key=lambda ex: order[ex.user_id])  # stable: keeps each user's time order

    def eval_examples(self, t: int | None) -> list[Example]:
        """Test queries whose history is restricted to the records absorbed after step t (None = full)."""
        if t is None:
            return self.eval
        keep = {u: {r.id for r in s.absorbed(t)} for u, s in self.streams.items()}
        return [
            Example(
                id=ex.id,
                user_id=ex.user_id,
                input=ex.input,
                target=ex.target,
                history=[r for r in ex.history if r.id in keep.get(ex.user_id, ())],
                query_date=ex.query_date,
                source_record_id=ex.source_record_id,
            )
            for ex in self.eval
        ]

    def describe(self) -> dict:
        sizes = [[len(c) for c in s.chunks] for s in self.streams.values()]
        return {
            "users": len(self.users),
            "bootstrap_records": sum(len(s.bootstrap) for s in self.streams.values()),
            "chunk_records": [sum(z[t] for z in sizes) for t in range(self.n_chunks)],
            "examples_per_step": [len(e) for e in self.examples],
            "eval_queries": len(self.eval),
        }


def split_chunks(records: list[Record], n_chunks: int) -> list[list[Record]]:
    """`n_chunks` contiguous, disjoint pieces in order; sizes differ by at most one (larger first)."""
    q, r = divmod(len(records), n_chunks)
    out, start = [], 0
    for i in range(n_chunks):
        size = q + (1 if i < r else 0)
        out.append(records[start : start + size])
        start += size
    return out


def stream_split(data: PreparedData, n_chunks: int = 5) -> OnlineSplit:
    """The streaming split of the evaluation users of `data` (their histories come from the
    test queries' profiles, exactly as `make_splits` builds their Stage-2 examples)."""
    task, s = data.task, data.splits
    profiles: dict[str, dict[str, Record]] = {u: {} for u in s.stage2_users}
    for ex in s.eval:
        for r in ex.history:
            profiles.setdefault(ex.user_id, {}).setdefault(r.id, r)
    streams, examples = {}, [[] for _ in range(n_chunks + 1)]
    for u in s.stage2_users:
        history = sort_chronologically(list(profiles[u].values()))
        half = len(history) // 2
        stream = UserStream(u, history[:half], split_chunks(history[half:], n_chunks))
        streams[u] = stream
        step_of = {r.id: 0 for r in stream.bootstrap}
        step_of.update({r.id: t + 1 for t, c in enumerate(stream.chunks) for r in c})
        # Records are chronological, so "the records before it" are exactly what was absorbed by then.
        for ex in record_examples(u, history, task):
            examples[step_of[ex.source_record_id]].append(ex)
    return OnlineSplit(task, list(s.stage2_users), streams, n_chunks, list(s.eval), examples)


# --- one method ----------------------------------------------------------------------------


@dataclass
class Trajectory:
    method: str
    metrics: list[dict[str, float]]  # R_0..R_T, all of the task's metrics
    cost: list[dict] = field(default_factory=list)  # per chunk t = 1..T
    # Each test query's share of the primary metric at R_T (tapper.eval.metrics.per_query_scores), for the
    # paired comparisons of the methods' end points.
    final_scores: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:  # JSON-safe, for pipeline artifacts
        return {"method": self.method, "metrics": self.metrics, "cost": self.cost, "final_scores": self.final_scores}

    @classmethod
    def from_dict(cls, d: dict) -> "Trajectory":
        return cls(d["method"], list(d["metrics"]), list(d.get("cost", [])), dict(d.get("final_scores", {})))


def predict(
    model: TapPer,
    bb,
    split: OnlineSplit,
    data: PreparedData,
    cfg: RunConfig,
    cache,
    t: int | None,
    progress=False,
    desc="eval",
) -> tuple[dict[str, str], list[Example]]:
    """Predictions for the test queries with the history absorbed after step t, and those queries."""
    examples = split.eval_examples(t)
    rows = model.user_rows if model.cfg.use_pu else None
    encoded = encoder_for(model, data.task, bb.tokenizer, cache).encode(examples, rows, progress=progress)
    preds = generate_texts(
        model, encoded, bb.tokenizer, data.task, cfg.eval.batch_size, cfg.eval.max_new_tokens, progress, desc
    )
    return preds, examples


def evaluate(
    model: TapPer,
    bb,
    split: OnlineSplit,
    data: PreparedData,
    cfg: RunConfig,
    cache,
    t: int | None,
    progress=False,
    desc="eval",
) -> dict[str, float]:
    preds, examples = predict(model, bb, split, data, cfg, cache, t, progress, desc)
    return score(data, preds, examples)


def train_bootstrap(
    stage1_dir: Path,
    split: OnlineSplit,
    data: PreparedData,
    cfg: RunConfig,
    ocfg: OnlineConfig,
    state_dir: Path,
    progress=True,
) -> tuple[Path, dict[str, float], float]:
    """Stage 2 on the bootstrap halves, saved to `state_dir`; returns (dir, R_0, training seconds)."""
    t0 = time.perf_counter()
    bb = load_backbone_dir(stage1_dir)
    cache = embedding_cache(bb)
    res = train_stage2(
        bb.model,
        bb.tokenizer,
        data.task,
        split.seen_examples(0),
        split.users,
        cfg.stage2,
        cache,
        seed=cfg.seed,
        backbone_hash=bb.weights_hash,
        progress=progress,
    )
    seconds = time.perf_counter() - t0
    res.model.save(state_dir)
    r0 = evaluate(res.model, bb, split, data, cfg, cache, eval_step(ocfg, "static", 0), progress, "eval R_0")
    return Path(state_dir), r0, seconds


def eval_step(ocfg: OnlineConfig, method: str, t: int) -> int | None:
    """History the test queries see after step t: see the module docstring."""
    if ocfg.eval_history == "full":
        return None
    return 0 if method == "static" else t


def simulate_method(
    method: str,
    stage1_dir: Path,
    bootstrap_dir: Path,
    r0: dict[str, float],
    split: OnlineSplit,
    data: PreparedData,
    cfg: RunConfig,
    ocfg: OnlineConfig,
    progress=False,
    on_step: StepLogger | None = None,
    final_dir: Path | None = None,
) -> Trajectory:
    """One method's trajectory R_0..R_T from the bootstrap checkpoint (R_0 is shared).

    With `final_dir`, the method's model after the last chunk is saved there (TapPer.save)."""
    seed = cfg.seed if ocfg.seed is None else ocfg.seed
    traj = Trajectory(method, [dict(r0)])
    if on_step:
        on_step(method, 0, split.fractions[0], r0)
    bb = load_backbone_dir(stage1_dir)
    cache = embedding_cache(bb)
    model = None if method == "full-retrain" else TapPer.load(bootstrap_dir, bb.model)
    for t in range(1, split.n_chunks + 1):
        t0 = time.perf_counter()
        if method == "static":
            cost = {"params_touched": 0, "seconds": 0.0, "n_examples": 0, "steps": 0}
        elif method in ("online-emb", "online-full"):
            mode = method.split("-")[1]
            rep = update_users(
                model,
                data.task,
                bb.tokenizer,
                cache,
                split.examples[t],
                mode,
                epochs=ocfg.epochs,
                steps=ocfg.steps,
                lr=ocfg.lr_emb if mode == "emb" else ocfg.lr_full,
                lambda_lr=ocfg.lambda_lr,
                batch_size=ocfg.batch_size,
                seed=seed * 1000 + t,
                progress=progress,
            )
            cost = {
                "params_touched": rep.params_touched,
                "seconds": rep.seconds,
                "n_examples": rep.n_examples,
                "steps": rep.steps,
                "users": len(rep.users),
                "losses": rep.losses,
            }
        elif method == "full-retrain":
            fresh = load_backbone_dir(stage1_dir)
            res = train_stage2(
                fresh.model,
                fresh.tokenizer,
                data.task,
                split.seen_examples(t),
                split.users,
                cfg.stage2,
                cache,
                seed=cfg.seed,
                backbone_hash=fresh.weights_hash,
                progress=progress,
            )
            model, bb = res.model, fresh
            groups = model.trainable_parameters()
            cost = {
                "params_touched": sum(p.numel() for ps in groups.values() for p in ps),
                "seconds": time.perf_counter() - t0,
                "n_examples": res.n_examples,
                "steps": steps_for(res.n_examples, cfg.stage2.batch_size, cfg.stage2.epochs),
                "losses": res.losses,
            }
        else:
            raise ValueError(f"unknown method {method!r}")
        cost["seconds"] = round(cost["seconds"], 4)
        traj.cost.append(cost)
        target = model if model is not None else TapPer.load(bootstrap_dir, bb.model)
        preds, examples = predict(
            target, bb, split, data, cfg, cache, eval_step(ocfg, method, t), progress, f"eval {method} t={t}"
        )
        metrics = score(data, preds, examples)
        traj.metrics.append(metrics)
        if t == split.n_chunks:
            traj.final_scores = query_scores(data, preds, examples)
        if on_step:
            on_step(method, t, split.fractions[t], metrics)
    if final_dir is not None and model is not None:
        model.save(final_dir)
    return traj


# --- the whole simulation ------------------------------------------------------------------


def trajectories_report(
    split: OnlineSplit, trajectories: dict[str, Trajectory], task, extra: dict | None = None
) -> dict:
    """The `trajectories.json` object: primary metric per method and step, plus costs."""
    metric = task.primary_metric
    report = {
        "metric": metric,
        "higher_is_better": task.higher_is_better,
        "fractions": split.fractions,
        "methods": {m: [r[metric] for r in tr.metrics] for m, tr in trajectories.items()},
        "all_metrics": {m: tr.metrics for m, tr in trajectories.items()},
        "cost": {m: _cost_summary(tr.cost) for m, tr in trajectories.items()},
    }
    methods = report["methods"]
    if "online-full" in methods and "full-retrain" in methods:
        report["final_gap_full_retrain_minus_online_full"] = methods["full-retrain"][-1] - methods["online-full"][-1]
    # The end points on the same test queries: mean difference and a 95 % paired-bootstrap interval.
    pairs = [
        ("online-emb", "static"),
        ("online-full", "static"),
        ("full-retrain", "static"),
        ("full-retrain", "online-full"),
    ]
    report["final_paired"] = {
        f"{a} - {b}": paired_difference(trajectories[a].final_scores, trajectories[b].final_scores)
        for a, b in pairs
        if a in trajectories and b in trajectories and trajectories[a].final_scores and trajectories[b].final_scores
    }
    report["split"] = split.describe()
    report.update(extra or {})
    return report


def _cost_summary(per_chunk: list[dict]) -> dict:
    seconds = [c["seconds"] for c in per_chunk]
    return {
        "params_touched_per_chunk": max((c["params_touched"] for c in per_chunk), default=0),
        "seconds_per_chunk": round(sum(seconds) / len(seconds), 4) if seconds else 0.0,
        "seconds_total": round(sum(seconds), 4),
        "per_chunk": per_chunk,
    }


def run_online(
    task_name: str | None,
    questions: str | Path,
    outputs: str | Path,
    backbone: str,
    out_dir: str | Path,
    cfg: RunConfig,
    ocfg: OnlineConfig,
    progress: bool = True,
    on_step: StepLogger | None = None,
) -> dict:
    """Stage 1 once, the bootstrap checkpoint, every method's trajectory; writes
    DIR/trajectories.json and DIR/online.png and returns the report."""
    from tapper.online.plot import plot_trajectories

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = prepare_data(task_name, questions, outputs, cfg.stage2_users)
    bb = open_backbone(backbone, data, cfg.seed, cfg.stage1.dtype)
    s1 = run_stage1(bb, data, cfg, out_dir / "stage1", progress)
    report = simulate(
        s1.path,
        data,
        cfg,
        ocfg,
        out_dir,
        progress,
        on_step,
        extra={"task": data.task.name, "backbone": backbone, "stage1": {"weights_hash": s1.weights_hash}},
    )
    report["seconds"] = round(time.time() - t0, 2)
    atomic_write_json(out_dir / "trajectories.json", report)
    plot_trajectories(report, out_dir / "online.png")
    return report


def simulate(
    stage1_dir: Path,
    data: PreparedData,
    cfg: RunConfig,
    ocfg: OnlineConfig,
    out_dir: Path,
    progress: bool = True,
    on_step: StepLogger | None = None,
    extra: dict | None = None,
) -> dict:
    """Everything after Stage 1 (what a pipeline step with a cached Stage-1 backbone calls):
    the stream split, the bootstrap checkpoint in out_dir/bootstrap, each method's trajectory and
    its model after the last chunk in out_dir/final/<method>."""
    split = stream_split(data, ocfg.chunks)
    boot_dir, r0, boot_seconds = train_bootstrap(
        stage1_dir, split, data, cfg, ocfg, Path(out_dir) / "bootstrap", progress
    )
    trajectories = {
        m: simulate_method(
            m, stage1_dir, boot_dir, r0, split, data, cfg, ocfg, progress, on_step, Path(out_dir) / "final" / m
        )
        for m in ocfg.methods
    }
    return trajectories_report(
        split,
        trajectories,
        data.task,
        {
            **(extra or {}),
            "bootstrap": {"metrics": r0, "seconds": round(boot_seconds, 4)},
            "config": {**cfg.to_dict(), "online": ocfg.to_dict()},
        },
    )
