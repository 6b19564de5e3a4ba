"""Training step time of this checkout against an older revision, side by side in one run, with MFU.

    python bench/throughput_vs.py [--old e5e76c3] [--backbone smollm2] [--stages 2,1] [--batch 4] [--seq 256]
                                  [--history 32] [--steps 3] [--rounds 2] [--threads 1] [--profile]
                                  [--out bench/results/throughput_vs_<old>_<backbone>_cpu.json]

The old revision is checked out in a temporary git worktree (removed afterwards); bench/step_timer.py runs
against each tree (PYTHONPATH), alternating old/new for --rounds rounds so that a change in the machine's load
hits both alike, and the best step time of each side is kept. e5e76c3 is main before issue 21 (the DIN's split
first layer, index-gather prefix inputs and sync-free generation landed after it, in f4c903c, then part 1's
precision settings and the hot-path fixes of item 3).

MFU = model FLOPs per second (bench/throughput.py's count for the step's shapes) / the peak matmul throughput
measured in this run, with the same thread count, before and after the timings (the higher one). The 1-minute
load average is recorded around every timing: on a shared machine it says how much the numbers can be trusted.
--profile: one more run of the new code per stage under torch.profiler, where its CPU time goes, by op and kind.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from tapper.atomic import atomic_write_json  # noqa: E402


def timed(code: Path, args, stage: int, profile: Path | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": str(args.threads)}
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "step_timer.py"),
        "--backbone",
        args.backbone,
        "--stage",
        str(stage),
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--history",
        str(args.history),
        "--steps",
        str(args.steps),
        "--threads",
        str(args.threads),
    ] + (["--profile", str(profile)] if profile else [])
    out = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak(args) -> float:
    import torch

    from throughput import matmul_peak

    torch.set_num_threads(args.threads)
    return matmul_peak(torch.device("cpu"), "fp32", args.matmul)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", default="e5e76c3")
    ap.add_argument("--backbone", default="smollm2")
    ap.add_argument("--stages", default="2,1")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--history", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--matmul", type=int, default=2048)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from throughput import model_flops

    from tapper.plan.backbones import backbone_config

    stages = [int(s) for s in args.stages.split(",")]
    old_rev = subprocess.run(
        ["git", "rev-parse", args.old], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    new_rev = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    # Code only: a results file rewritten by an earlier run is not a change to what is measured.
    dirty = bool(
        subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    peaks = [peak(args)]
    tmp = Path(tempfile.mkdtemp(prefix="tapper-old-"))
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(tmp / "tree"), old_rev], cwd=ROOT, check=True, capture_output=True
    )
    runs: dict[int, dict[str, list[dict]]] = {s: {"old": [], "new": []} for s in stages}
    try:
        for _ in range(args.rounds):
            for s in stages:
                runs[s]["old"].append(timed(tmp / "tree", args, s))
                runs[s]["new"].append(timed(ROOT, args, s))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tmp / "tree")], cwd=ROOT, check=False)
    peaks.append(peak(args))
    flops = model_flops(backbone_config(args.backbone), args.batch * args.seq, args.seq)
    best_peak = max(peaks)
    results = {}
    for s in stages:
        best = {k: min(r["step_s"] for r in v) for k, v in runs[s].items()}
        cpu = {k: min(r["step_cpu_s"] for r in v) for k, v in runs[s].items()}
        # Two readings: wall time (what a dedicated machine would show, if the load was equal) and this process's
        # CPU seconds per step (insensitive to waiting for a core on a shared machine).
        results[str(s)] = {
            "runs": runs[s],
            "best_step_s": best,
            "speedup": best["old"] / best["new"],
            "best_step_cpu_s": cpu,
            "cpu_speedup": cpu["old"] / cpu["new"],
            "tokens_per_s": {k: args.batch * args.seq / v for k, v in best.items()},
            "mfu": {k: flops / v / best_peak for k, v in best.items()},
            "mfu_cpu_time": {k: flops / v / best_peak for k, v in cpu.items()},
        }
        if args.profile:
            prof = tmp.with_name(tmp.name + f"-profile-{s}.json")
            timed(ROOT, args, s, prof)
            results[str(s)]["profile_new"] = json.loads(prof.read_text())
            prof.unlink()
    loads = [x for st in runs.values() for side in st.values() for r in side for x in r.get("load_1min", [])]
    res = {
        "old": old_rev,
        "new": new_rev,
        "new_has_uncommitted_changes": dirty,
        "backbone": args.backbone,
        "settings": vars(args),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": args.threads},
        "load_1min": {"min": min(loads), "max": max(loads), "mean": sum(loads) / len(loads)},
        "matmul_peak_flops": best_peak,
        "matmul_peaks": peaks,
        "model_flops_per_step": flops,
        "stages": results,
    }
    out = Path(args.out or ROOT / "bench" / "results" / f"throughput_vs_{args.old}_{args.backbone}_cpu.json")
    atomic_write_json(out, res)
    print(
        f"matmul peak {best_peak / 1e9:.1f} GFLOP/s ({args.threads} thread(s)); load {res['load_1min']['min']:.2f}-"
        f"{res['load_1min']['max']:.2f}"
    )
    for s, r in results.items():
        b, c = r["best_step_s"], r["best_step_cpu_s"]
        print(
            f"stage {s}, {args.backbone}: old {b['old']:.2f} s, new {b['new']:.2f} s per step, speedup "
            f"{r['speedup']:.2f}x "
            f"(CPU s/step {c['old']:.2f} -> {c['new']:.2f}, {r['cpu_speedup']:.2f}x); MFU old {r['mfu']['old']:.1%}, "
            f"new {r['mfu']['new']:.1%}"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
