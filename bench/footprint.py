"""Stored personalization parameters of TAP-PER, P_q-only and OPPU for 100 ... 1,000,000 users.

    python bench/footprint.py [--backbones tiny,smollm2,llama-3.1-8b] [--out bench/results/footprint_cpu.json]

Counts come from the real modules (PrefixEncoder, bridge LoRA, OPPU's LoRA) built on each backbone's
configuration on the meta device (no memory), see tapper/analysis/footprint.py. Writes the JSON and a
log-log plot beside it (footprint.png).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tapper.analysis.footprint import write_footprint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--backbones", default="smollm2,llama-3.1-8b", help="comma-separated: tiny, smollm2, llama-3.1-8b, or HF dirs"
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "footprint_cpu.json"))
    args = ap.parse_args()
    t0 = time.time()
    out = Path(args.out)
    results = write_footprint(args.backbones.split(","), out, out.with_suffix(".png"))
    for r in results:
        m = r["methods"]
        print(
            f"{r['backbone']}: per user  TAP-PER {m['tap-per']['per_user']:,}  P_q-only {m['pq-only']['per_user']:,}  "
            f"OPPU {m['oppu']['per_user']:,}  ({r['oppu_over_tapper_per_user']}x);  shared TAP-PER "
            f"{m['tap-per']['shared']:,};  "
            f"TAP-PER/OPPU total at {r['tapper_over_oppu_total_at']['users']:,} users = "
            f"{r['tapper_over_oppu_total_at']['ratio']:.2%}"
        )
    print(f"wrote {out} and {out.with_suffix('.png')} in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
