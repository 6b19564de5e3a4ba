"""What knowing a user's labels is worth on a synthetic build: label-counting oracles.

For each evaluation query (the queries of the N most active users, as
`tapper experiment --stage2-users N` evaluates), the text names 2-3 candidate
categories; the oracles pick the candidate the user chose most often in their
history (all of it, or only the last k records), ties broken by how popular a
category is over all users. "popular" ignores the user entirely: the best a
non-personalized model can do from the text. These are the ceilings the
synthetic check's numbers should be read against.

    python bench/synthetic_oracle.py data/syn --stage2-users 80 [--last 5,10,15] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tapper.builders.synthetic import candidates_in  # noqa: E402
from tapper.data import load_lamp  # noqa: E402
from tapper.data.splits import user_history, users_by_activity  # noqa: E402
from tapper.experiment import load_user_groups  # noqa: E402


def oracle_accuracy(build: Path, stage2_users: int, windows: list[int]) -> dict:
    ds = load_lamp(build / "questions.json", build / "outputs.json")
    drifting = set(load_user_groups(build / "users.json")["drifting"])
    by_user = ds.by_user()
    popular = Counter(r.fields["category"] for qs in by_user.values() for r in user_history(qs))
    strategies = {"popular": None, "count-all": 0, **{f"count-last-{k}": k for k in windows}}
    hits: dict[str, dict[str, list[bool]]] = {s: {"all": [], "drifting": [], "stable": []} for s in strategies}
    for user in users_by_activity(ds)[:stage2_users]:
        history = user_history(by_user[user])
        # A user's queries share one history, so each window's label counts are counted once.
        counts = {
            name: Counter(r.fields["category"] for r in (history[-k:] if k else history))
            for name, k in strategies.items()
            if k is not None
        }
        for q in by_user[user]:
            candidates = candidates_in(q.input.split("article:")[-1])
            for name in strategies:
                if name == "popular":
                    pick = max(candidates, key=lambda c: popular[c])
                else:
                    pick = max(candidates, key=lambda c: (counts[name][c], popular[c]))
                ok = pick == q.output
                hits[name]["all"].append(ok)
                hits[name]["drifting" if user in drifting else "stable"].append(ok)
    return {name: {g: round(sum(v) / len(v), 4) for g, v in groups.items() if v} for name, groups in hits.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("build", type=Path, help="a `tapper build synthetic` output directory")
    parser.add_argument(
        "--stage2-users", type=int, default=80, help="evaluate the N most active users' queries (default 80)"
    )
    parser.add_argument(
        "--last", default="5,10,15", help="history windows for the recent-count oracles (default 5,10,15)"
    )
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    result = oracle_accuracy(args.build, args.stage2_users, [int(k) for k in args.last.split(",") if k])
    for name, groups in result.items():
        print(f"{name:16s} " + "  ".join(f"{g} {v:.3f}" for g, v in groups.items()))
    if args.out:
        args.out.write_text(
            json.dumps({"build": str(args.build), "stage2_users": args.stage2_users, "accuracy": result}, indent=1)
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
