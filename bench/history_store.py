"""What the serving history store costs to load, and to write back, as users grow to millions.

    python bench/history_store.py [--users 100000,1000000] [--history 10] [--spool-dir DIR]
                                  [--out bench/results/history_store_cpu.json]

For each user count it writes one history file of `--history` records per user in the format bundles and
snapshots use now (`histories.jsonl`, one user per line) and the same histories in the one-document
`histories.json` they used before, streaming both so that the writer never holds them in memory. Each file is
then loaded by `HistoryStore.read` in a fresh process, which reports the seconds the load took and the resident
memory it added (all of it, `rss_added_mb`, and the anonymous part, `rss_anon_added_mb`: RssAnon in
/proc/self/status), then reads one user (the first request for a user converts that user's records) and writes
the store back as a snapshot does (`write_histories`; unread users pass through). Records are shaped like
news-category items: id, date, text, title, category.

The JSON-lines file is loaded twice: in memory (`jsonl`, the default) and spooled (`jsonl_spooled`: the
`--scratch-dir` mode, each user's line copied into an unlinked spool file in `--spool-dir`, default a temporary
directory next to the files; put it on the local disk a server would use).

`bench/feedback_state.py` measures the whole serving path (user table included) up to 100,000 users; this one
isolates the history store, which is the part whose cost grew with every user's records.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_io import write_results  # noqa: E402
from tapper.data.tasks import LAMP_2N_LABELS  # noqa: E402

_PROBE = """
import json, sys, time
sys.path.insert(0, sys.argv[2])
from deploy.histories import HistoryStore, write_histories
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
def rss_anon():
    # Anonymous memory only: a spool's pages are page cache (written with write(2), never mapped), not counted here.
    line = next(x for x in open('/proc/self/status') if x.startswith('RssAnon:'))
    return int(line.split()[1]) * 1024
spool_dir = sys.argv[3] or None
before, before_anon = rss(), rss_anon(); t0 = time.perf_counter()
store = HistoryStore.read(sys.argv[1], spool_dir)
load_s = time.perf_counter() - t0
added, added_anon = rss() - before, rss_anon() - before_anon
out = {"load_s": round(load_s, 3), "rss_added_mb": round(added / 1e6, 1),
       "rss_anon_added_mb": round(added_anon / 1e6, 1), "users": len(store)}
if len(sys.argv) > 4:
    t0 = time.perf_counter(); first = next(iter(store)); n = len(store[first])
    out["first_read_ms"] = round(1000 * (time.perf_counter() - t0), 2)
    t0 = time.perf_counter(); write_histories(sys.argv[4], store)
    out["write_back_s"] = round(time.perf_counter() - t0, 3)
print(json.dumps(out))
"""


def probe_history_file(path: Path, write_to: Path | None = None, spool_dir: Path | None = None) -> dict:
    """Load `path` with HistoryStore.read (spooled into `spool_dir` if given) in a fresh process: seconds and
    resident memory the store adds; with `write_to`, also the first read of one user and the time to write the
    store back there."""
    argv = [sys.executable, "-c", _PROBE, str(path), str(ROOT), str(spool_dir or "")] + (
        [str(write_to)] if write_to else []
    )
    out = subprocess.run(argv, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return {"file_bytes": path.stat().st_size, **json.loads(out.stdout)}


def _items(rng: random.Random, user: str, history: int) -> list[dict]:
    first = dt.date(2020, 1, 1)
    out = []
    for j in range(history):
        label = rng.choice(LAMP_2N_LABELS)
        out.append(
            {
                "id": f"{user}-{j}",
                "date": (first + dt.timedelta(days=j)).isoformat(),
                "text": f"a story about {label} number {user}-{j}",
                "title": f"On {label}",
                "category": label,
            }
        )
    return out


def write_both(n_users: int, history: int, work: Path, seed: int = 0) -> tuple[Path, Path]:
    """The same histories as JSON lines and as one legacy JSON document, streamed to disk."""
    rng = random.Random(seed)
    lines, legacy = work / "histories.jsonl", work / "histories.json"
    with open(lines, "w", encoding="utf-8") as fl, open(legacy, "w", encoding="utf-8") as fj:
        fj.write("{")
        for i in range(n_users):
            user = f"u{i:07d}"
            items = _items(rng, user, history)
            fl.write(json.dumps({"user": user, "records": items}, separators=(",", ":")) + "\n")
            fj.write(("," if i else "") + json.dumps(user) + ":" + json.dumps(items, separators=(",", ":")))
        fj.write("}\n")
    return lines, legacy


def _same_bytes(a: Path, b: Path, chunk: int = 1 << 24) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", default="100000,1000000", help="comma-separated user counts (default: %(default)s)")
    ap.add_argument("--history", type=int, default=10, help="records per user (default: %(default)s)")
    ap.add_argument(
        "--spool-dir",
        type=Path,
        default=None,
        help="where the spooled load keeps its spool file (default: a temporary dir beside the files)",
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "history_store_cpu.json")
    args = ap.parse_args(argv)
    rows = []
    for n in [int(x) for x in args.users.split(",")]:
        with tempfile.TemporaryDirectory(prefix="tapper-history-bench-") as tmp:
            t0 = time.perf_counter()
            lines, legacy = write_both(n, args.history, Path(tmp))
            print(f"{n:>9,} users: files written in {time.perf_counter() - t0:.0f} s", flush=True)
            row = {
                "users": n,
                "history_per_user": args.history,
                "jsonl": probe_history_file(lines, Path(tmp) / "back.jsonl"),
                "legacy_json": probe_history_file(legacy, Path(tmp) / "back-from-legacy.jsonl"),
                "jsonl_spooled": probe_history_file(
                    lines, Path(tmp) / "back-spooled.jsonl", args.spool_dir or Path(tmp) / "spool"
                ),
            }
            # The spooled store writes back exactly what the in-memory one does.
            row["jsonl_spooled"]["write_back_identical"] = _same_bytes(
                Path(tmp) / "back.jsonl", Path(tmp) / "back-spooled.jsonl"
            )
        rows.append(row)
        for name in ("jsonl", "legacy_json", "jsonl_spooled"):
            r = row[name]
            print(
                f"{n:>9,} users, {name:>13}: load {r['load_s']} s, +{r['rss_added_mb']} MB resident "
                f"(+{r['rss_anon_added_mb']} MB anonymous), write back {r['write_back_s']} s",
                flush=True,
            )
    write_results(args.out, "history_store.py", argv, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
