"""The benchmark suite: one registry of named benchmarks and the runner behind `python -m bench`.

    python -m bench                      # list the suite (same as `python -m bench list`)
    python -m bench NAME [--quick] [ARGS ...]   # run one benchmark; ARGS go to its script after the registry's own
    python -m bench quick [NAME ...]     # every quick mode (systems first), results under bench/results/quick/

Each benchmark is a script in bench/ run as its own process with the arguments registered here. A full run
writes bench/results/<results>_<machine>.json (the committed results the docs cite); a quick run writes
bench/results/quick/<results>_<machine>.json (git-ignored), so quick runs never overwrite committed results.
After the script has written its JSON the runner adds a "bench" block to it (see bench/README.md).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
QUICK_RESULTS = RESULTS / "quick"
KINDS = ("systems", "science")
# bench/*.py files that are not benchmarks of their own.
HELPERS = {
    "__init__.py": "makes bench/ a package (`python -m bench`)",
    "__main__.py": "`python -m bench`",
    "suite.py": "this registry and runner",
    "bench_io.py": "write_results(): machine + command + results",
    "step_timer.py": "one Stage-2 timing, run by throughput_vs.py against each checkout",
}

Cmd = tuple[str, ...]


@dataclass(frozen=True)
class Bench:
    """One benchmark. Commands are argument tuples with placeholders: {out} the results file, {work} a temporary
    directory of this run (removed afterwards), {root} the repository. A `prepare` command whose first word is
    `tapper` runs `python -m tapper.cli`; one whose first word ends in .py runs that bench/ script."""

    name: str
    kind: str  # "science" (what the method does) | "systems" (what it costs)
    goal: str  # one line: the question it answers
    script: str  # bench/<script>
    args: Cmd  # full mode: reproduces the committed results file
    quick: Cmd | None  # quick mode: the same code path at toy size, tiny backbone (None: see `no_quick`)
    results: str  # results file stem: bench/results/<results>_<machine>.json
    page: str | None = None  # docs/results page that cites the results
    prepare: tuple[Cmd, ...] = ()  # commands run before the full mode (datasets, runs an analysis reads)
    quick_prepare: tuple[Cmd, ...] = ()
    no_quick: str = ""  # why there is no quick mode
    params: str | None = None  # a systems benchmark's spec (bench/specs/systems/<name>.json) its argv come from

    def results_file(self, machine: str, quick: bool = False) -> Path:
        return (QUICK_RESULTS if quick else RESULTS) / f"{self.results}_{machine}.json"

    def spec_of(self, quick: bool = False) -> str | None:
        """The spec a mode runs: a science sweep's spec file (an argument of its script; the quick mode has its
        own) or a systems benchmark's parameter file (bench/specs/systems/<name>.json, both modes)."""
        return self.params or next(
            (a for a in (self.quick if quick else self.args) or () if a.startswith("bench/specs/")), None
        )

    @property
    def spec(self) -> str | None:
        """The spec of the full mode."""
        return self.spec_of()


_SWEEP = "bench/specs/science"
_SYSTEMS = "bench/specs/systems"


def _systems(name: str, goal: str, script: str, results: str, page: str | None = None) -> Bench:
    """A systems benchmark whose parameters are data: bench/specs/systems/<name>.json holds the script's
    argument lists for the full mode ("full", which reproduces the committed results) and the quick mode
    ("quick"), so changing what a benchmark measures is an edit of its spec, not of this registry."""
    spec = f"{_SYSTEMS}/{name}.json"
    try:
        params = json.loads((ROOT / spec).read_text())
        full, quick = tuple(params.pop("full")), tuple(params.pop("quick"))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f'{spec}: a systems spec is a JSON object with lists "full" and "quick" ({err!r})') from err
    if params:
        raise ValueError(f'{spec}: unknown keys {sorted(params)} (a systems spec holds "full" and "quick")')
    return Bench(name, "systems", goal, script, full, quick, results, page=page, params=spec)


REGISTRY: tuple[Bench, ...] = (
    # ---- systems: what TAP-PER costs to train, store and serve (parameters in bench/specs/systems/) ---------------
    _systems(
        "footprint",
        "stored parameters per user and shared, TAP-PER against OPPU, counted from the real modules on the meta device",
        "footprint.py",
        "footprint",
        page="docs/results/footprint.md",
    ),
    _systems(
        "train_time",
        "per-user training time as a history grows: OPPU's LoRA against TAP-PER's user row",
        "train_time.py",
        "train_time_smollm2",
        page="docs/results/footprint.md",
    ),
    _systems(
        "throughput",
        "Stage-1 and Stage-2 training tokens/s, step time and MFU",
        "throughput.py",
        "throughput_smollm2",
        page="docs/results/throughput.md",
    ),
    _systems(
        "throughput_vs",
        "Stage-2 and Stage-1 step time and MFU of this checkout against the code before issue 21 (e5e76c3), "
        "alternated, with a profile of the new step",
        "throughput_vs.py",
        "throughput_vs_e5e76c3_smollm2",
        page="docs/results/throughput.md",
    ),
    _systems(
        "precision",
        "bf16 + gradient checkpointing against fp32: the loss curve over 52 steps on the embedded news data "
        "and one step's peak memory, tiny backbone",
        "precision.py",
        "precision_tiny",
        page="docs/results/precision-and-plan.md",
    ),
    _systems(
        "hotpaths",
        "the hot paths around the training step (backbone hash, record pooling, BM25 pre-filter, generation "
        "padding), old form against new on the same data",
        "hotpaths.py",
        "hotpaths_smollm2",
        page="docs/results/throughput.md",
    ),
    _systems(
        "serving",
        "latency and throughput of real servers: TAP-PER against the bare backbone and RAG-k4, and "
        "predictions while feedback streams in",
        "serving.py",
        "serving",
        page="docs/results/serving.md",
    ),
    _systems(
        "serving_profile",
        "where one prediction batch's time goes (prefix, retrieval, forward pass)",
        "serving_profile.py",
        "serving_profile_smollm2",
        page="docs/results/serving.md",
    ),
    _systems(
        "feedback_state",
        "what one serving feedback writes and costs as users grow to 100,000, and the server's memory with "
        "and without --scratch-dir",
        "feedback_state.py",
        "feedback_state",
        page="docs/results/serving-state.md",
    ),
    _systems(
        "history_store",
        "loading and writing back the serving history store up to a million users",
        "history_store.py",
        "history_store",
        page="docs/results/serving-state.md",
    ),
    _systems(
        "paged_table",
        "the user table in memory against the paged (--scratch-dir) table: load, memory, row access",
        "paged_table.py",
        "paged_table",
        page="docs/results/serving-state.md",
    ),
    # ---- science: what the method learns ------------------------------------------------------------------------
    Bench(
        "core_v2",
        "science",
        "does TAP-PER learn what a user's history holds? base, RAG, OPPU, P_q-only, TAP-PER "
        "and readouts over four seeds",
        "synthetic_sweep.py",
        (f"{_SWEEP}/core_v2.json", "--jobs", "2", "--out", "{out}"),
        (f"{_SWEEP}/core_v2_quick.json", "--out", "{out}"),
        "core_v2",
        page="docs/results/core.md",
    ),
    Bench(
        "core_diagnostics",
        "science",
        "where a trained TAP-PER loses the user's signal (train vs held-out, attention, inputs), on seed 1 of core_v2",
        "core_diagnostics.py",
        ("{work}/runs/V2-s1", "--out", "{out}"),
        ("{work}/runs/Q-s0", "--train-sample", "20", "--out", "{out}"),
        "core_diagnostics_s1",
        page="docs/results/core.md",
        prepare=(
            (
                "bench/synthetic_sweep.py",
                f"{_SWEEP}/core_v2.json",
                "--runs",
                "V2-s1",
                "--work",
                "{work}",
                "--out",
                "{work}/sweep.json",
            ),
        ),
        quick_prepare=(
            (
                "bench/synthetic_sweep.py",
                f"{_SWEEP}/core_v2_quick.json",
                "--work",
                "{work}",
                "--out",
                "{work}/sweep.json",
            ),
        ),
    ),
    Bench(
        "synthetic_oracle",
        "science",
        "what knowing a user's labels is worth: label-counting oracles on the synthetic build the core check uses",
        "synthetic_oracle.py",
        ("{work}/syn", "--stage2-users", "80", "--out", "{out}"),
        ("{work}/syn", "--stage2-users", "10", "--out", "{out}"),
        "synthetic_oracle",
        prepare=(
            (
                "tapper",
                "build",
                "synthetic",
                "--out",
                "{work}/syn",
                "--users",
                "300",
                "--queries-per-user",
                "4",
                "--seed",
                "0",
            ),
        ),
        quick_prepare=(
            (
                "tapper",
                "build",
                "synthetic",
                "--out",
                "{work}/syn",
                "--users",
                "60",
                "--queries-per-user",
                "2",
                "--seed",
                "0",
            ),
        ),
    ),
    Bench(
        "online_synthetic",
        "science",
        "the paper's online adaptation (Static, Online-Emb, Online-Full, "
        "Full-Retrain) on drifting users, over four seeds",
        "online_seeds.py",
        (f"{_SWEEP}/online_synthetic.json", "--jobs", "2", "--out", "{out}"),
        (f"{_SWEEP}/online_synthetic_quick.json", "--out", "{out}"),
        "online_synthetic",
        page="docs/results/online.md",
    ),
    Bench(
        "online_synthetic_stable",
        "science",
        "the same simulation where no user drifts (the control)",
        "online_seeds.py",
        (f"{_SWEEP}/online_synthetic_stable.json", "--jobs", "2", "--runs", "OS-s0,OS-s1", "--out", "{out}"),
        None,
        "online_synthetic_stable",
        page="docs/results/online.md",
        no_quick="the same runner and code path as online_synthetic's quick mode",
    ),
    Bench(
        "online_groups",
        "science",
        "online_synthetic's final models scored per user group (drifting / stable)",
        "online_groups.py",
        ("{work}/runs/O-s1", "{work}/runs/O-s2", "{work}/runs/O-s3", "--data", "{work}/drift", "--out", "{out}"),
        ("{work}/runs/OQ-s0", "--data", "{work}/drift", "--out", "{out}"),
        "online_synthetic_groups",
        page="docs/results/online.md",
        prepare=(
            (
                "bench/online_seeds.py",
                f"{_SWEEP}/online_synthetic.json",
                "--jobs",
                "2",
                "--runs",
                "O-s1,O-s2,O-s3",
                "--work",
                "{work}",
                "--out",
                "{work}/seeds.json",
            ),
        ),
        quick_prepare=(
            (
                "bench/online_seeds.py",
                f"{_SWEEP}/online_synthetic_quick.json",
                "--work",
                "{work}",
                "--out",
                "{work}/seeds.json",
            ),
        ),
    ),
)
BY_NAME = {b.name: b for b in REGISTRY}


def machine_tag() -> str:
    """`cpu`, or the accelerator's model in lower case (`h100`, `a100`, ...): the suffix of a results file."""
    import torch

    if torch.cuda.is_available():
        m = re.search(r"\b([A-Z]+\d{2,4})\b", torch.cuda.get_device_name(0))
        return m.group(1).lower() if m else "gpu"
    return "cpu"


def machine_info() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": f"cuda: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "cpu",
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def _fill(cmd: Cmd, out: Path, work: Path) -> list[str]:
    return [a.format(out=out, work=work, root=ROOT) for a in cmd]


def _argv(cmd: list[str]) -> list[str]:
    if cmd[0] == "tapper":
        return [sys.executable, "-m", "tapper.cli", *cmd[1:]]
    if cmd[0].endswith(".py"):
        return [sys.executable, str(ROOT / cmd[0]), *cmd[1:]]
    return cmd


def _env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _git_commit() -> str | None:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev.strip() + ("+dirty" if dirty else "")


def stamp(out: Path, block: dict) -> Path | None:
    """Add the "bench" block to a results JSON object (a results file that is a list gets `<name>.bench.json`)."""
    if not out.exists():
        return None
    doc = json.loads(out.read_text())
    if isinstance(doc, dict):
        doc["bench"] = block
        target, text = out, json.dumps(doc, indent=1)
    else:
        target, text = out.with_suffix(".bench.json"), json.dumps(block, indent=1)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(target)
    return target


def run(
    bench: Bench,
    quick: bool = False,
    extra: list[str] | None = None,
    machine: str | None = None,
    keep_work: bool = False,
) -> dict:
    """Run one benchmark (its prepare commands, then its script); return a summary row."""
    extra = list(extra or [])
    cmd = bench.quick if quick else bench.args
    if cmd is None:
        return {"name": bench.name, "kind": bench.kind, "status": "skipped", "seconds": 0.0, "why": bench.no_quick}
    machine = machine or machine_tag()
    out = bench.results_file(machine, quick)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"tapper-bench-{bench.name}-"))
    env = _env()
    t0 = time.time()
    status = "ok"
    try:
        for prep in bench.quick_prepare if quick else bench.prepare:
            argv = _argv(_fill(prep, out, work))
            print("$", " ".join(["python", *argv[1:]] if argv[0] == sys.executable else argv), flush=True)
            subprocess.run(argv, cwd=ROOT, env=env, check=True)
        argv = [sys.executable, str(BENCH / bench.script), *_fill(cmd, out, work), *extra]
        print("$", "python", " ".join(argv[1:]), flush=True)
        rc = subprocess.run(argv, cwd=ROOT, env=env).returncode
        if rc != 0:
            status = f"failed (exit {rc})"
    except subprocess.CalledProcessError as e:
        status = f"failed (prepare exit {e.returncode})"
    finally:
        if keep_work:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    seconds = round(time.time() - t0, 1)
    if status == "ok":
        mode = ["--quick"] if quick else []
        block = {
            "name": bench.name,
            "kind": bench.kind,
            "mode": "quick" if quick else "full",
            "command": " ".join(["python -m bench", bench.name, *mode, *extra]).strip(),
            "script": " ".join(
                [f"python bench/{bench.script}", *_fill(cmd, out.relative_to(ROOT), Path("{work}")), *extra]
            ),
            "prepare": [
                " ".join(
                    [
                        "python -m tapper.cli" if c[0] == "tapper" else f"python {c[0]}",
                        *_fill(c[1:], out.relative_to(ROOT), Path("{work}")),
                    ]
                )
                for c in (bench.quick_prepare if quick else bench.prepare)
            ],
            "spec": bench.spec_of(quick),
            "machine": machine_info(),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "seconds": seconds,
            "commit": _git_commit(),
        }
        written = stamp(out, block)
        if written is None:
            status = f"failed (no results file {out.relative_to(ROOT)})"
    return {
        "name": bench.name,
        "kind": bench.kind,
        "status": status,
        "seconds": seconds,
        "results": str(out.relative_to(ROOT)),
    }


def listing() -> str:
    lines = []
    for kind in KINDS:
        lines.append(f"{kind}:")
        for b in (b for b in REGISTRY if b.kind == kind):
            lines.append(f"  {b.name:<24} {b.goal}")
            if b.params:
                lines.append(f"  {'':<24} spec:  {b.params}")
            for prep in b.prepare:
                lines.append(
                    f"  {'':<24} first: "
                    + ("python -m tapper.cli " if prep[0] == "tapper" else "python ")
                    + " ".join(prep[1:] if prep[0] == "tapper" else prep)
                )
            lines.append(f"  {'':<24} full:  python bench/{b.script} {' '.join(b.args)}")
            lines.append(
                f"  {'':<24} quick: "
                + (f"python bench/{b.script} {' '.join(b.quick)}" if b.quick else f"none ({b.no_quick})")
            )
            lines.append(f"  {'':<24} -> bench/results/{b.results}_<machine>.json" + (f", {b.page}" if b.page else ""))
    lines.append("")
    lines.append(
        "python -m bench NAME [--quick] [ARGS]  runs one; python -m bench quick  runs every quick mode "
        "(results in bench/results/quick/)"
    )
    return "\n".join(lines)


def run_quick(names: list[str]) -> int:
    chosen = [BY_NAME[n] for n in names] if names else sorted(REGISTRY, key=lambda b: KINDS.index(b.kind))
    machine = machine_tag()
    rows = []
    t0 = time.time()
    for b in chosen:
        print(f"\n=== {b.name} ({b.kind}, quick) ===", flush=True)
        rows.append(run(b, quick=True, machine=machine))
    total = time.time() - t0
    print(f"\n{'benchmark':<24} {'kind':<8} {'seconds':>8}  status / results")
    for r in rows:
        print(
            f"{r['name']:<24} {r['kind']:<8} {r['seconds']:>8.1f}  {r['status']}"
            + (f"  {r['results']}" if r["status"] == "ok" else f"  {r.get('why', '')}")
        )
    print(
        f"quick suite: {sum(r['status'] == 'ok' for r in rows)} ok, "
        f"{sum(r['status'].startswith('failed') for r in rows)} failed, "
        f"{sum(r['status'] == 'skipped' for r in rows)} skipped, {total / 60:.1f} min"
    )
    return 1 if any(r["status"].startswith("failed") for r in rows) else 0


USAGE = __doc__.split("\n\n")[1]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] == "list":
        print(listing())
        return 0
    if argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        print(listing())
        return 0
    if argv[0] == "quick":
        unknown = [n for n in argv[1:] if n not in BY_NAME]
        if unknown:
            print(f"unknown benchmark(s): {', '.join(unknown)}; `python -m bench list` names them", file=sys.stderr)
            return 2
        return run_quick(argv[1:])
    name, rest = argv[0], argv[1:]
    if name not in BY_NAME:
        print(f"unknown benchmark {name!r}; `python -m bench list` names them\n{USAGE}", file=sys.stderr)
        return 2
    quick = "--quick" in rest
    keep = "--keep-work" in rest
    extra = [a for a in rest if a not in ("--quick", "--keep-work")]
    row = run(BY_NAME[name], quick=quick, extra=extra, keep_work=keep)
    print(f"{row['name']}: {row['status']} in {row['seconds']} s" + (f", {row['results']}" if "results" in row else ""))
    return 0 if row["status"] == "ok" else 1
