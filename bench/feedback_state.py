"""What one serving feedback costs as the number of users grows: the journal delta against a full snapshot.

    python bench/feedback_state.py [--users 1000,10000,100000] [--history 10] [--feedbacks 20] [--new-users 20]
                                   [--out bench/results/feedback_state_cpu.json]

For each user count it builds a real bundle (tiny backbone, a TapPer state with that many rows of the user
table, `--history` records per user), loads a real TapperService on it, and sends `--feedbacks` feedbacks to
random users through `TapperService.feedback` (the Online-Emb update and the journal write, as /feedback does),
then `--new-users` first feedbacks of users the table does not hold yet (each needs a row; the table keeps spare
rows, so only some of them reallocate it, which is counted). It records the bytes each feedback wrote and its
wall time, and the bytes and time of one snapshot of the
whole state (`LiveState.start_generation` with the model: what every feedback wrote before the journal, and
what compaction writes every `compact_every` feedbacks), and the time a restarted server needs to load.

It also loads the bundle's history file alone in a fresh process, to see what the history store costs
(seconds, and resident memory added): as written now (JSON lines, each user's line kept as text until read),
and the same histories in the one-document `histories.json` that bundles held before
(`bench/history_store.py` does that alone, up to millions of users).

And it loads the whole server in a fresh process, twice: with the per-user state in memory (the default) and with
`--scratch-dir` (the user table paged, the histories spooled, into a scratch directory next to the bundle), then
sends the same `--feedbacks` feedbacks to each: the anonymous memory (RssAnon) and file pages mapped (RssFile)
after load and after the feedbacks, and the load time. That is what a replica's memory limit has to hold.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from deploy.bundle import export_bundle  # noqa: E402
from deploy.histories import HistoryStore, histories_to_json  # noqa: E402
from bench_io import write_results  # noqa: E402
from history_store import probe_history_file  # noqa: E402
from tapper.atomic import atomic_write_json  # noqa: E402
from deploy.service import ServeConfig, TapperService  # noqa: E402
from tapper.config import Stage2Config  # noqa: E402
from tapper.data.tasks import LAMP_2N_LABELS  # noqa: E402
from tapper.data.types import Record  # noqa: E402
from tapper.model.backbone import load_backbone  # noqa: E402
from tapper.model.tapper import TapPer  # noqa: E402


def _record(rng: random.Random, rid: str, day: int) -> Record:
    import datetime as dt

    date = dt.date(2020, 1, 1) + dt.timedelta(days=day)
    label = rng.choice(LAMP_2N_LABELS)
    return Record(
        id=rid,
        fields={"text": f"a story about {label} number {rid}", "title": f"On {label}", "category": label},
        date=date,
        raw_date=date.isoformat(),
    )


_SERVER_PROBE = """
import json, os, random, sys, time
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, os.path.join(sys.argv[1], "bench"))
import torch
torch.set_num_threads(1)
from deploy.service import ServeConfig, TapperService
from feedback_state import _record
def status(key):
    return int(next(x for x in open('/proc/self/status') if x.startswith(key + ':')).split()[1]) * 1024 / 1e6
bundle, live, scratch, n = sys.argv[2], sys.argv[3], sys.argv[4] or None, int(sys.argv[5])
base = {"anon_mb": status("RssAnon"), "file_mb": status("RssFile")}
t0 = time.perf_counter()
svc = TapperService(ServeConfig(model_dir=bundle, state_dir=live, scratch_dir=scratch, feedback_steps=1,
                                sync_seconds=0, compact_every=10 ** 9))
ld = svc.load()
out = {"load_s": round(time.perf_counter() - t0, 3),
       "after_load": {"anon_added_mb": round(status("RssAnon") - base["anon_mb"], 1),
                      "file_added_mb": round(status("RssFile") - base["file_mb"], 1)}}
rng = random.Random(0)
users = list(ld.model.user_ids)
for k in range(n):
    user = rng.choice(users)
    svc.feedback(user, [_record(rng, f"{user}-probe{k}", 10 ** 4 + k)])
out["after_feedbacks"] = {"anon_added_mb": round(status("RssAnon") - base["anon_mb"], 1),
                          "file_added_mb": round(status("RssFile") - base["file_mb"], 1)}
out["peak_rss_mb"] = round(status("VmHWM"), 1)
print(json.dumps(out))
"""


def probe_server(bundle: Path, work: Path, scratch: Path | None, feedbacks: int) -> dict:
    """A fresh process loads a TapperService on `bundle` (per-user state on `scratch` if given) and takes
    `feedbacks` feedbacks: load seconds and memory added (anonymous, and file pages mapped), after load and after."""
    live = work / ("live-scratch" if scratch else "live-memory")
    argv = [
        sys.executable,
        "-c",
        _SERVER_PROBE,
        str(Path(__file__).resolve().parent.parent),
        str(bundle),
        str(live),
        str(scratch or ""),
        str(feedbacks),
    ]
    out = subprocess.run(argv, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(n_users: int, history: int, feedbacks: int, new_users: int, work: Path, seed: int = 0) -> dict:
    rng = random.Random(seed)
    users = [f"u{i:07d}" for i in range(n_users)]
    histories = {u: [_record(rng, f"{u}-{j}", j) for j in range(history)] for u in users}
    bb = load_backbone("tiny", texts=[f"a story about {c} On {c}" for c in LAMP_2N_LABELS])
    model = TapPer(bb.model, users, Stage2Config(), backbone_hash=bb.weights_hash)
    model.save(work / "state")
    bundle = export_bundle(bb.path, work / "state", "LaMP_2N", work / "bundle", version="bench", histories=histories)
    del model, histories
    legacy = atomic_write_json(
        work / "legacy" / "histories.json", histories_to_json(HistoryStore.read(bundle.histories_file)), compact=True
    )
    store_cost = {"jsonl": probe_history_file(bundle.histories_file), "legacy_json": probe_history_file(legacy)}
    legacy.unlink()
    server_memory = {
        "in_memory": probe_server(bundle.path, work, None, feedbacks),
        "scratch_dir": probe_server(bundle.path, work, work / "scratch", feedbacks),
    }

    cfg = ServeConfig(
        model_dir=bundle.path, state_dir=work / "live", feedback_steps=1, sync_seconds=0, compact_every=10**9
    )
    t0 = time.perf_counter()
    svc = TapperService(cfg)
    ld = svc.load()
    load_s = time.perf_counter() - t0

    latencies, written = [], []
    for k in range(feedbacks):
        user = rng.choice(users)
        before = _du(cfg.state_dir) if cfg.state_dir.exists() else 0
        t0 = time.perf_counter()
        svc.feedback(user, [_record(rng, f"{user}-fb{k}", history + k)])
        latencies.append(time.perf_counter() - t0)
        written.append(_du(cfg.state_dir) - before)
    # The first feedback of a bundle also writes the generation's meta.json; the rest are deltas only.
    delta_bytes = statistics.median(written[1:]) if len(written) > 1 else written[0]

    new_latencies, reallocations = [], 0
    for k in range(new_users):
        table = ld.model.prefix.user_table
        t0 = time.perf_counter()
        svc.feedback(f"new{k:05d}", [_record(rng, f"new{k}-fb", history + feedbacks + k)])
        new_latencies.append(time.perf_counter() - t0)
        reallocations += ld.model.prefix.user_table is not table

    t0 = time.perf_counter()
    snap = svc.state.start_generation(
        bundle_id=ld.bundle_id,
        bundle_version=ld.bundle.version,
        bundle_path=ld.bundle.path,
        parent=ld.generation,
        parent_sequence=ld.sequence,
        model=ld.model,
        histories=ld.histories,
    )
    snapshot_s = time.perf_counter() - t0
    snapshot_bytes = _du(cfg.state_dir / snap)

    t0 = time.perf_counter()
    TapperService(cfg).load()
    reload_s = time.perf_counter() - t0
    width = ld.model.prefix.user_table.embedding_dim
    return {
        "users": n_users,
        "history_per_user": history,
        "row_floats": width,
        "user_table_bytes": (n_users + 1) * width * 4,
        "load_s": round(load_s, 3),
        "reload_from_snapshot_s": round(reload_s, 3),
        "feedbacks": feedbacks,
        "feedback_ms_median": round(1000 * statistics.median(latencies), 1),
        "feedback_ms_max": round(1000 * max(latencies), 1),
        "feedback_bytes_median": int(delta_bytes),
        "new_users": new_users,
        "new_user_feedback_ms_median": round(1000 * statistics.median(new_latencies), 1) if new_latencies else None,
        "new_user_feedback_ms_max": round(1000 * max(new_latencies), 1) if new_latencies else None,
        "new_user_table_reallocations": reallocations,
        "snapshot_bytes": snapshot_bytes,
        "snapshot_s": round(snapshot_s, 3),
        "history_store": store_cost,
        "server_memory": server_memory,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", default="1000,10000,100000", help="comma-separated user counts (default: %(default)s)")
    ap.add_argument("--history", type=int, default=10, help="records per user in the bundle (default: %(default)s)")
    ap.add_argument("--feedbacks", type=int, default=20, help="feedbacks timed per user count (default: %(default)s)")
    ap.add_argument(
        "--new-users", type=int, default=20, help="first feedbacks of new users timed (default: %(default)s)"
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "feedback_state_cpu.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for n in [int(x) for x in args.users.split(",")]:
        with tempfile.TemporaryDirectory(prefix="tapper-feedback-bench-") as tmp:
            row = measure(n, args.history, args.feedbacks, args.new_users, Path(tmp))
        rows.append(row)
        print(
            f"{n:>9,} users: feedback {row['feedback_ms_median']:>7.1f} ms, {row['feedback_bytes_median']:>9,} B "
            "written;  "
            f"new user {row['new_user_feedback_ms_median']} ms ({row['new_user_table_reallocations']} reallocations);  "
            f"snapshot {row['snapshot_s']:>7.2f} s, {row['snapshot_bytes']:>13,} B;  load {row['load_s']:.1f} s;  "
            f"history store {row['history_store']['jsonl']['load_s']} s, "
            f"+{row['history_store']['jsonl']['rss_added_mb']} MB "
            f"(legacy JSON {row['history_store']['legacy_json']['load_s']} s, "
            f"+{row['history_store']['legacy_json']['rss_added_mb']} MB)",
            flush=True,
        )
        for mode, m in row["server_memory"].items():
            print(
                f"{'':>16}server, state {mode:>11}: load {m['load_s']} s, anonymous "
                f"+{m['after_load']['anon_added_mb']} MB "
                f"(+{m['after_feedbacks']['anon_added_mb']} MB after the feedbacks), file pages "
                f"+{m['after_load']['file_added_mb']} / +{m['after_feedbacks']['file_added_mb']} MB",
                flush=True,
            )
    write_results(args.out, "feedback_state.py", argv, rows, torch=torch.__version__, threads=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
