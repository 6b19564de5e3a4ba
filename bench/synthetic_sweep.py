"""Synthetic drifting-preference sweep: `tapper experiment` over datasets, settings and seeds.

One training run says little about a few-point difference (the seed of Stage 1
and Stage 2 alone moves TAP-PER by several points here), so the claims of the
core issue (TAP-PER vs the Stage-1 base, λ = 0 on drifting users) are read off
several seeds. A spec (JSON, see bench/specs/science/) names the datasets as
`tapper build synthetic` flags, settings common to all runs, and the runs:

    {"data": {"d0": "--users 300 --queries-per-user 4 --seed 0"},
     "common": ["stage2.epochs=6", ...],
     "runs": [{"name": "A-s0", "data": "d0", "set": ["seed=0"], "users": 80,
               "variants": "base,tap-per,lambda0"}]}

Runs go in parallel (`--jobs`), each a real `tapper experiment` process; the
result JSON has every run's accuracy overall and per user group (drifting /
stable, from the build's users.json) and, per group of runs sharing a prefix
before "-s<seed>", the mean and standard deviation over seeds.

    python bench/synthetic_sweep.py bench/specs/science/core_v2.json --jobs 2 --out bench/results/core_v2_cpu.json

Seeds run at different times (`--runs A-s0 --out a.json`, `--runs A-s1 --out b.json`)
are combined with `--merge a.json b.json --out all.json`. A sweep stopped part way (given
`--work`) keeps its finished runs: `--collect --work DIR` reports those without running
anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent


def tapper_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tapper.cli", *args]


def run_sweep(spec: dict, work: Path, jobs: int, limit_s: float | None) -> dict:
    def command(run: dict, d: Path) -> list[str]:
        cmd = tapper_cmd(
            "experiment",
            "--questions",
            str(d / "questions.json"),
            "--outputs",
            str(d / "outputs.json"),
            "--backbone",
            run.get("backbone", "tiny"),
            "--out",
            str(work / "runs" / run["name"]),
            "--stage2-users",
            str(run.get("users", 80)),
            "--variants",
            run.get("variants", "base,tap-per,lambda0"),
            "--no-progress",
        )
        return cmd + [a for kv in spec.get("common", []) + run.get("set", []) for a in ("--set", kv)]

    return run_processes(spec, work, jobs, limit_s, command, read_run)


def run_processes(
    spec: dict,
    work: Path,
    jobs: int,
    limit_s: float | None,
    command: Callable[[dict, Path], list[str]],
    read: Callable[[Path, str, float], dict],
) -> dict:
    """Build the spec's datasets, then run one process per run, `jobs` at a time.

    `command(run, data_dir)` gives a run's command line, `read(work, name, seconds)` its
    result row once it has ended (or been killed at `limit_s`). Shared with
    bench/online_seeds.py, whose runs are `tapper online` instead of `tapper experiment`."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, jobs))))
    for name, flags in spec["data"].items():
        subprocess.run(
            tapper_cmd("build", "synthetic", "--out", str(work / name), *flags.split()),
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
            cwd=ROOT,
        )
    pending = list(spec["runs"])
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    results: dict[str, dict] = {}
    deadline = time.time() + limit_s if limit_s else None
    while pending or running:
        while pending and len(running) < jobs:
            run = pending.pop(0)
            log = open(work / f"{run['name']}.log", "w")
            proc = subprocess.Popen(
                command(run, work / run["data"]), env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
            )
            running[run["name"]] = (proc, time.time())
        time.sleep(1)
        for name, (proc, t0) in list(running.items()):
            if proc.poll() is None and not (deadline and time.time() > deadline):
                continue
            if proc.poll() is None:
                proc.kill()
            del running[name]
            results[name] = read(work, name, time.time() - t0)
            print(name, json.dumps(results[name]), flush=True)
    return results


def machine(jobs: int) -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "device": "cuda: " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "jobs": jobs,
    }


def read_run(work: Path, name: str, seconds: float) -> dict:
    metrics = work / "runs" / name / "metrics.json"
    if not metrics.exists():
        return {"failed": (work / f"{name}.log").read_text()[-2000:]}
    m = json.loads(metrics.read_text())
    row: dict = {v: round(x["accuracy"], 4) for v, x in m["variants"].items()}
    for variant, groups in (m.get("groups") or {}).items():
        for group, x in groups.items():
            row[f"{variant}@{group}"] = round(x["accuracy"], 4)
            row[f"n@{group}"] = x.get("n")
    row["lambdas"] = {
        v: [round(x["lambda_t"], 3), round(x["lambda_o"], 3)]
        for v, x in m.get("details", {}).items()
        if "lambda_t" in x
    }
    row["seconds"] = round(seconds)
    return row


def aggregate(results: dict[str, dict]) -> dict[str, dict]:
    """Mean and sd over seeds for runs named <group>-s<seed>."""
    groups: dict[str, list[dict]] = {}
    for name, row in results.items():
        match = re.fullmatch(r"(.+)-s\d+", name)
        if match and "failed" not in row:
            groups.setdefault(match.group(1), []).append(row)
    out = {}
    for group, rows in groups.items():
        keys = [k for k in rows[0] if isinstance(rows[0][k], float) and all(k in r for r in rows)]
        stats = {
            k: {
                "mean": round(statistics.mean(r[k] for r in rows), 4),
                "sd": round(statistics.stdev(r[k] for r in rows), 4) if len(rows) > 1 else 0.0,
            }
            for k in keys
        }
        # Paired differences, seed by seed: what the claims are about (TAP-PER against every other row).
        others = [k for k in keys if "@" not in k and k != "tap-per"]
        pairs = [
            ("tap-per", "base", "tap-per_minus_base"),
            ("tap-per@drifting", "lambda0@drifting", "lambda_gain@drifting"),
            ("tap-per", "lambda0", "lambda_gain"),
        ]
        pairs += [("tap-per", o, f"tap-per_minus_{o}") for o in others if o not in ("base", "lambda0")]
        for a, b, label in pairs:
            if all(a in r and b in r for r in rows):
                diffs = [r[a] - r[b] for r in rows]
                stats[label] = {
                    "mean": round(statistics.mean(diffs), 4),
                    "sd": round(statistics.stdev(diffs), 4) if len(diffs) > 1 else 0.0,
                    "per_seed": [round(d, 4) for d in diffs],
                }
        out[group] = {"seeds": len(rows), **stats}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", type=Path, help="sweep spec JSON (see bench/specs/science/)")
    parser.add_argument("--jobs", type=int, default=1, help="experiments run at once (default 1)")
    parser.add_argument("--out", type=Path, help="result JSON (default bench/results/synthetic_<spec name>.json)")
    parser.add_argument("--work", type=Path, help="where data and runs go (default: a temporary directory)")
    parser.add_argument("--limit-s", type=float, help="kill runs still going after this many seconds")
    parser.add_argument("--runs", help="comma-separated run names to do (default: all in the spec)")
    parser.add_argument(
        "--collect",
        action="store_true",
        help="run nothing: report the runs of the spec that finished in --work (a sweep stopped part way)",
    )
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        metavar="RESULT",
        help="run nothing: combine result JSONs of parts of this spec (e.g. seeds run at different "
        "times with --runs) into one, with the mean and sd over all their seeds",
    )
    args = parser.parse_args(argv)
    spec = json.loads(args.spec.read_text())
    if args.merge:
        if not args.out:
            parser.error("--merge needs --out")
        try:
            report = merge_reports(spec, args.merge)
        except ValueError as e:
            parser.error(str(e))
        write_report(report, args.out)
        return 0
    if args.runs:
        try:
            spec = select_runs(spec, args.runs.split(","))
        except ValueError as e:
            parser.error(f"{args.spec}: {e}")
    out = args.out or ROOT / "bench" / "results" / f"synthetic_{args.spec.stem}.json"
    if args.collect:
        if not args.work:
            parser.error("--collect needs --work")
        write_report(collect_runs(spec, args.work, args.jobs), out)
        return 0
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = run_sweep(spec, work, max(1, args.jobs), args.limit_s)
    report = {
        "machine": machine(args.jobs),
        "spec": spec,
        "results": results,
        "by_group": aggregate(results),
        "seconds": round(time.time() - t0),
    }
    write_report(report, out)
    return 0


def collect_runs(spec: dict, work: Path, jobs: int) -> dict:
    """The report of the spec's runs that finished in `work` (metrics.json with nothing pending);
    the others are listed under "not_finished", and the report's spec holds only the finished ones,
    so it merges (--merge) with a later report of the rest."""
    done, not_finished = {}, []
    for run in spec["runs"]:
        metrics = work / "runs" / run["name"] / "metrics.json"
        m = json.loads(metrics.read_text()) if metrics.is_file() else None
        if m is None or m.get("pending"):
            not_finished.append(run["name"])
            continue
        done[run["name"]] = read_run(work, run["name"], m.get("seconds", 0.0))
    if not done:
        raise SystemExit(f"{work}: no run of the spec has finished")
    return {
        "machine": machine(jobs),
        "spec": select_runs(spec, list(done)),
        "results": done,
        "by_group": aggregate(done),
        "seconds": round(sum(r["seconds"] for r in done.values())),
        "collected_from": str(work),
        "not_finished": not_finished,
    }


def select_runs(spec: dict, wanted: list[str]) -> dict:
    """The spec cut down to the named runs and the datasets they use."""
    unknown = sorted(set(wanted) - {r["name"] for r in spec["runs"]})
    if unknown:
        raise ValueError(f"no run named {', '.join(unknown)}")
    runs = [r for r in spec["runs"] if r["name"] in wanted]
    return dict(spec, runs=runs, data={k: v for k, v in spec["data"].items() if any(r["data"] == k for r in runs)})


def write_report(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(report, indent=1) + "\n")
    tmp_out.replace(out)
    print(f"wrote {out}")


def merge_reports(
    spec: dict, paths: list[Path], summarize: Callable[[dict], dict] | None = None, key: str = "by_group"
) -> dict:
    """One report from several partial ones of `spec`: their runs together, re-aggregated
    (by `summarize` into `key`; bench/online_seeds.py passes its own)."""
    results: dict[str, dict] = {}
    parts = []
    for path in paths:
        part = json.loads(path.read_text())
        if part.get("spec", {}).get("common") != spec.get("common"):
            raise ValueError(f"{path}: its settings ('common') differ from the spec's; not the same sweep")
        for name, row in part["results"].items():
            if name in results:
                raise ValueError(f"{path}: run {name!r} is in more than one of the files")
            results[name] = row
        parts.append(
            {"file": path.name, "machine": part["machine"], "runs": sorted(part["results"]), "seconds": part["seconds"]}
        )
    names = {r["name"] for r in spec["runs"]}
    unknown = sorted(set(results) - names)
    if unknown:
        raise ValueError(f"runs {unknown} are not in the spec")
    return {
        "machine": parts[0]["machine"],
        "merged_from": parts,
        "spec": spec,
        "results": results,
        key: (summarize or aggregate)(results),
        "seconds": sum(p["seconds"] for p in parts),
    }


if __name__ == "__main__":
    sys.exit(main())
