"""Stage-2 step time of this checkout against an older revision, side by side in one run.

    python bench/throughput_vs.py [--old e5e76c3] [--backbone smollm2] [--batch 4] [--seq 256] [--steps 3] [--rounds 2]
                                  [--out bench/results/throughput_vs_<old>_<backbone>_cpu.json]

The old revision is checked out in a temporary git worktree (removed afterwards); bench/step_timer.py runs
against each tree (PYTHONPATH), alternating old/new for --rounds rounds so that a change in the machine's load
hits both alike, and the best step time of each side is kept. e5e76c3 is main before issue 21's hot-path fixes
(index-gather prefix inputs, the DIN's split first layer, sync-free generation: f4c903c, filed under issue 17).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tapper.atomic import atomic_write_json  # noqa: E402


def timed(code: Path, args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, str(ROOT / "bench" / "step_timer.py"), "--backbone", args.backbone, "--batch", str(args.batch),
           "--seq", str(args.seq), "--history", str(args.history), "--steps", str(args.steps), "--threads", str(args.threads)]
    out = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", default="e5e76c3")
    ap.add_argument("--backbone", default="smollm2")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--history", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    old_rev = subprocess.run(["git", "rev-parse", args.old], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    new_rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    tmp = Path(tempfile.mkdtemp(prefix="tapper-old-"))
    subprocess.run(["git", "worktree", "add", "--detach", str(tmp / "tree"), old_rev], cwd=ROOT, check=True, capture_output=True)
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    try:
        for _ in range(args.rounds):
            runs["old"].append(timed(tmp / "tree", args))
            runs["new"].append(timed(ROOT, args))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tmp / "tree")], cwd=ROOT, check=False)
    best = {k: min(r["step_s"] for r in v) for k, v in runs.items()}
    cpu = {k: min(r["step_cpu_s"] for r in v) for k, v in runs.items()}
    # Two readings: wall time (what a dedicated machine would show, if the load was equal) and this process's CPU
    # seconds per step (insensitive to waiting for a core on a shared machine).
    res = {"old": old_rev, "new": new_rev, "backbone": args.backbone, "settings": vars(args), "runs": runs,
           "best_step_s": best, "speedup": best["old"] / best["new"], "best_step_cpu_s": cpu,
           "cpu_speedup": cpu["old"] / cpu["new"]}
    out = Path(args.out or ROOT / "bench" / "results" / f"throughput_vs_{args.old}_{args.backbone}_cpu.json")
    atomic_write_json(out, res)
    print(f"Stage-2 step, {args.backbone}: old {best['old']:.2f} s, new {best['new']:.2f} s, speedup {res['speedup']:.2f}x; "
          f"CPU seconds per step old {cpu['old']:.2f}, new {cpu['new']:.2f}, {res['cpu_speedup']:.2f}x; wrote {out}")


if __name__ == "__main__":
    main()
