"""Per-user training time as a user's history grows: OPPU (LoRA per user) vs TAP-PER (P_u row only) vs P_q-only.

    python bench/train_time.py [--backbone tiny|smollm2] [--lengths 8,16,32,64] [--epochs 1] [--threads 1]
                               [--out bench/results/train_time_<backbone>_cpu.json]

Wall-clock seconds of the per-user optimisation loop (best of --repeats), on a synthetic LaMP-2N user;
see tapper/analysis/timing.py. Writes the JSON and a plot beside it. Cost on the 2-core CPU box: tiny,
default lengths ~30 s; smollm2 with --lengths 8,16,32 --repeats 1 ~5 min (one thread).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tapper.analysis.timing import plot_timing, time_user_training  # noqa: E402
from tapper.atomic import atomic_write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="tiny")
    ap.add_argument("--lengths", default="8,16,32,64")
    ap.add_argument("--epochs", type=float, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadier on a shared machine)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or Path(__file__).parent / "results" / f"train_time_{args.backbone}_cpu.json")
    t0 = time.time()
    res = time_user_training(
        args.backbone,
        tuple(int(x) for x in args.lengths.split(",")),
        args.epochs,
        args.batch_size,
        args.max_len,
        threads=args.threads,
        repeats=args.repeats,
    )
    res["wall_s"] = round(time.time() - t0, 1)
    atomic_write_json(out, res)
    plot_timing(res, out.with_suffix(".png"))
    for r in res["rows"]:
        print(f"history {r['history']:4d}: OPPU {r['oppu_s']:.3f}s  TAP-PER (P_u) {r['tapper_s']:.3f}s  P_q-only 0 s")
    print(f"wrote {out} in {res['wall_s']} s")


if __name__ == "__main__":
    main()
