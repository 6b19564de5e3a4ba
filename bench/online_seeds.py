"""Online-adaptation simulation over seeds: `tapper online` runs, mean and spread per step.

One `tapper online` run scores 4 methods after each of T chunks; on a few hundred
queries one query is worth 0.3 points or more, so "Full-Retrain is the upper bound"
or "Online-Full ends above Static" can only be read off several seeds. A spec (JSON,
see bench/specs/science/online_*.json) has the same shape as bench/synthetic_sweep.py's:

    {"data": {"drift": "--users 300 --queries-per-user 4 --seed 0 --drift-fraction 0.8"},
     "users": 80,
     "common": ["stage2.epochs=5", "online.chunks=5", "online.epochs=2", ...],
     "runs": [{"name": "O-s0", "data": "drift", "set": ["seed=0"]}, ...]}

Each run is a real `tapper online` process (`--jobs` at a time). The result JSON has
every run's trajectories and, over the seeds, per method and step the mean and sd,
and the paired differences the protocol is about (Full-Retrain − Online-Full,
Online-Full − Static, ...) with how many seeds each was ≥ 0 in. A plot of the mean
trajectories with ±1 sd bands is written next to it (same name, .png).

    python bench/online_seeds.py bench/specs/science/online_synthetic.json --jobs 2 --runs O-s1,O-s2 --out part.json

A run made earlier by hand joins with `--adopt NAME=DIR/trajectories.json` (its
settings must equal the spec's for that run, checked key by key), and parts run at
different times combine with `--merge a.json b.json --out all.json`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _sweep_module():
    # bench/ is not a package: load the sibling script that owns the process runner.
    spec = importlib.util.spec_from_file_location("synthetic_sweep", Path(__file__).with_name("synthetic_sweep.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sweep = _sweep_module()

# (a, b): the paired difference a − b per step, seed by seed.
PAIRS = (
    ("full-retrain", "online-full"),
    ("full-retrain", "online-emb"),
    ("online-full", "static"),
    ("online-emb", "static"),
    ("full-retrain", "static"),
    ("online-full", "online-emb"),
)


def run_settings(spec: dict, run: dict) -> list[str]:
    return [f"stage2_users={run.get('users', spec.get('users', 80))}", *spec.get("common", []), *run.get("set", [])]


def expected_config(spec: dict, run: dict) -> dict:
    from tapper.online.config import load_online_config

    cfg, ocfg = load_online_config({}, run_settings(spec, run))
    return {**cfg.to_dict(), "online": ocfg.to_dict()}


def stored_config(config: dict) -> dict:
    """A report's config read back through today's dataclasses: keys added since it ran take their defaults."""
    from tapper.online.config import load_online_config

    cfg, ocfg = load_online_config(json.loads(json.dumps(config)))
    return {**cfg.to_dict(), "online": ocfg.to_dict()}


def config_differences(expected: dict, got: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(expected) | set(got)):
        a, b = expected.get(key), got.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: spec {a!r}, run {b!r}")
    return out


def result_row(report: dict, seconds: float | None = None) -> dict:
    """What the sweep keeps of one trajectories.json."""
    return {
        "metric": report["metric"],
        "higher_is_better": report.get("higher_is_better", True),
        "fractions": report["fractions"],
        "methods": report["methods"],
        "final_gap_full_retrain_minus_online_full": report.get("final_gap_full_retrain_minus_online_full"),
        "cost": {
            m: {k: c[k] for k in ("params_touched_per_chunk", "seconds_per_chunk")} for m, c in report["cost"].items()
        },
        "split": report.get("split"),
        "config": report.get("config"),
        "seconds": round(seconds if seconds is not None else report.get("seconds", 0)),
    }


def read_run(work: Path, name: str, seconds: float) -> dict:
    path = work / "runs" / name / "trajectories.json"
    if not path.exists():
        return {"failed": (work / f"{name}.log").read_text()[-2000:]}
    return result_row(json.loads(path.read_text()), seconds)


def _stats(values: list[float]) -> dict:
    return {
        "mean": round(statistics.mean(values), 4),
        "sd": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
    }


def aggregate(results: dict[str, dict]) -> dict:
    """Per method and step: mean and sd over seeds; per pair: paired differences."""
    rows = [r for r in results.values() if "failed" not in r]
    if not rows:
        return {}
    fractions = rows[0]["fractions"]
    for r in rows:
        # Seeds change training only; the data split must be the same, which also catches an
        # adopted run made on other data.
        if r["fractions"] != fractions or r["metric"] != rows[0]["metric"] or r.get("split") != rows[0].get("split"):
            raise ValueError("runs differ in metric, chunking or data split; they are not seeds of one simulation")
    methods = [m for m in rows[0]["methods"] if all(m in r["methods"] for r in rows)]
    steps = range(len(fractions))
    out: dict = {
        "seeds": len(rows),
        "metric": rows[0]["metric"],
        "fractions": fractions,
        "methods": {m: [_stats([r["methods"][m][t] for r in rows]) for t in steps] for m in methods},
        "differences": {},
    }
    sign = 1 if rows[0].get("higher_is_better", True) else -1
    for a, b in PAIRS:
        if a in methods and b in methods:
            per_step = []
            for t in steps:
                diffs = [r["methods"][a][t] - r["methods"][b][t] for r in rows]
                per_step.append(
                    {
                        **_stats(diffs),
                        "per_seed": [round(d, 4) for d in diffs],
                        # "a is at least as good as b" in this many seeds (sign-aware for error metrics).
                        "seeds_a_not_worse": sum(sign * d >= -1e-9 for d in diffs),
                    }
                )
            out["differences"][f"{a}_minus_{b}"] = per_step
    out["cost"] = {
        m: {
            k: round(statistics.mean(r["cost"][m][k] for r in rows), 2)
            for k in ("params_touched_per_chunk", "seconds_per_chunk")
        }
        for m in methods
    }
    return out


def adopt(spec: dict, name: str, path: Path) -> dict:
    """A finished `tapper online` report as the spec's run `name`, if its settings are that run's."""
    runs = {r["name"]: r for r in spec["runs"]}
    if name not in runs:
        raise ValueError(f"{path}: run {name!r} is not in the spec")
    report = json.loads(path.read_text())
    diffs = config_differences(expected_config(spec, runs[name]), stored_config(report.get("config") or {}))
    if diffs:
        raise ValueError(f"{path}: settings differ from the spec's run {name!r}: " + "; ".join(diffs))
    return result_row(report)


def merge_reports(spec: dict, paths: list[Path]) -> dict:
    return sweep.merge_reports(spec, paths, summarize=aggregate, key="summary")


def plot_summary(summary: dict, path: Path, title: str) -> Path:
    """Left: mean trajectory per method, ±1 sd band over seeds (Figure 6 with error bands).
    Right: each method's paired gain over Static, seed by seed, mean ± sd: the seeds' different
    starting points (one bootstrap per seed) drop out, so what the updates did is easier to read."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from tapper.atomic import atomic_write
    from tapper.online.plot import LABELS, STYLE

    fig = Figure(figsize=(10.0, 3.8), dpi=120)
    FigureCanvasAgg(fig)
    xs = [100 * f for f in summary["fractions"]]
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)

    def draw(ax, method: str, points: list[dict]) -> None:
        mean, sd = [p["mean"] for p in points], [p["sd"] for p in points]
        style = STYLE.get(method, {})
        ax.plot(xs, mean, label=LABELS.get(method, method), linewidth=1.6, markersize=4, **style)
        ax.fill_between(
            xs,
            [m - s for m, s in zip(mean, sd)],
            [m + s for m, s in zip(mean, sd)],
            color=style.get("color"),
            alpha=0.12,
            linewidth=0,
        )

    for method, points in summary["methods"].items():
        draw(left, method, points)
    for method in summary["methods"]:
        gains = summary["differences"].get(f"{method}_minus_static")
        if gains:
            draw(right, method, gains)
    right.axhline(0.0, color=STYLE["static"]["color"], linestyle="--", linewidth=1.2, label="Static")
    left.set_ylabel(f"{summary['metric']} (mean ± sd, {summary['seeds']} seeds)")
    right.set_ylabel(f"{summary['metric']} − Static, paired (mean ± sd)")
    for ax in (left, right):
        ax.set_xlabel("history absorbed (%)")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def write(report: dict, out: Path, title: str) -> None:
    sweep.write_report(report, out)
    if report.get("summary"):
        print(f"wrote {plot_summary(report['summary'], out.with_suffix('.png'), title)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", type=Path, help="sweep spec JSON (see bench/specs/science/online_*.json)")
    parser.add_argument("--jobs", type=int, default=1, help="simulations run at once (default 1)")
    parser.add_argument(
        "--out", type=Path, help="result JSON (default bench/results/<spec name>.json); the plot goes beside it"
    )
    parser.add_argument("--work", type=Path, help="where data and runs go (default: a temporary directory)")
    parser.add_argument("--limit-s", type=float, help="kill runs still going after this many seconds")
    parser.add_argument("--runs", help="comma-separated run names to do (default: all in the spec)")
    parser.add_argument(
        "--adopt",
        action="append",
        default=[],
        metavar="NAME=TRAJECTORIES_JSON",
        help="count a finished `tapper online` report as run NAME (its settings are checked); repeatable",
    )
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        metavar="RESULT",
        help="run nothing: combine result JSONs of parts of this spec into one",
    )
    args = parser.parse_args(argv)
    spec = json.loads(args.spec.read_text())
    out = args.out or ROOT / "bench" / "results" / f"{args.spec.stem}.json"
    title = f"online adaptation over seeds ({args.spec.stem})"
    if args.merge:
        try:
            report = merge_reports(spec, args.merge)
        except ValueError as e:
            parser.error(str(e))
        write(report, out, title)
        return 0
    adopted: dict[str, dict] = {}
    for item in args.adopt:
        name, sep, path = item.partition("=")
        if not sep:
            parser.error(f"--adopt {item!r}: expected NAME=PATH")
        try:
            adopted[name] = adopt(spec, name, Path(path))
        except (ValueError, OSError) as e:
            parser.error(str(e))
    wanted = args.runs.split(",") if args.runs else [r["name"] for r in spec["runs"] if r["name"] not in adopted]
    try:
        todo = (
            sweep.select_runs(spec, [w for w in wanted if w not in adopted]) if wanted else dict(spec, runs=[], data={})
        )
    except ValueError as e:
        parser.error(f"{args.spec}: {e}")
    t0 = time.time()
    results = dict(adopted)
    if todo["runs"]:
        with tempfile.TemporaryDirectory() as tmp:
            work = args.work or Path(tmp)
            work.mkdir(parents=True, exist_ok=True)

            def command(run: dict, d: Path) -> list[str]:
                cmd = sweep.tapper_cmd(
                    "online",
                    "--questions",
                    str(d / "questions.json"),
                    "--outputs",
                    str(d / "outputs.json"),
                    "--backbone",
                    run.get("backbone", "tiny"),
                    "--out",
                    str(work / "runs" / run["name"]),
                    "--no-progress",
                )
                return cmd + [a for kv in run_settings(spec, run) for a in ("--set", kv)]

            results.update(sweep.run_processes(todo, work, max(1, args.jobs), args.limit_s, command, read_run))
    report = {
        "machine": sweep.machine(args.jobs),
        "spec": spec,
        "results": results,
        "summary": aggregate(results),
        "seconds": round(time.time() - t0) + sum(r.get("seconds", 0) for r in adopted.values()),
    }
    write(report, out, title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
