"""The user table in memory against the paged table (--table-dir): load time, resident memory, row access.

    python bench/paged_table.py [--users 100000] [--width 4608] [--rows 1000] [--table-dir DIR]
                                [--out bench/results/paged_table_cpu.json]

Writes a safetensors state holding `prefix.user_table.weight` of users + 1 rows of `--width` float32 (8*576 =
4608, SmolLM2's L*d), then, for each mode in a fresh process (so the two never share memory or page cache
mappings):

- memory: what TapPer.load does without a table dir: an empty table, safetensors.load_file of the file, a copy in;
- paged:  what it does with one: tapper.model.paged_table.load_paged_table (a shared mapping of an unlinked
  scratch file in --table-dir, filled in chunks).

Each reports the load time and, from /proc/self/status, RssAnon, RssFile, RssShmem and VmHWM (peak resident)
after load, after reading `--rows` random rows, and after writing `--rows` random rows, plus the median time of
one row read and one row write. Page cache is not process memory: the paged table's rows live there (written
back to the scratch file by the kernel); /proc/meminfo's Dirty is recorded too (machine-wide, so noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_io import write_results  # noqa: E402

TABLE_KEY = "prefix.user_table.weight"

_PROBE = r"""
import json, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from torch import nn
mode, state, table_dir, n_rows, seed = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
KEY = "prefix.user_table.weight"

def status():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("RssAnon", "RssFile", "RssShmem", "VmHWM"):
            out[k + "_mb"] = round(int(v.split()[0]) / 1024, 1)
    for line in open("/proc/meminfo"):
        if line.startswith("Dirty:"):
            out["system_dirty_mb"] = round(int(line.split()[1]) / 1024, 1)
    return out

torch.set_num_threads(1)
before = status()
t0 = time.perf_counter()
if mode == "memory":
    # TapPer.load without a table dir: PrefixEncoder(init_user_table=False) then load_state_dict from load_file.
    from safetensors.torch import load_file
    from safetensors import safe_open
    with safe_open(state, framework="pt") as f:
        rows, width = f.get_slice(KEY).get_shape()
    table = nn.Embedding(rows, width, _weight=torch.empty(rows, width))
    tensors = load_file(state)
    with torch.no_grad():
        table.weight.copy_(tensors[KEY])
    del tensors
    weight = table.weight
else:
    from tapper.model.paged_table import load_paged_table, prepare_table_dir
    weight = nn.Embedding.from_pretrained(load_paged_table(state, prepare_table_dir(table_dir)), freeze=False).weight
load_s = time.perf_counter() - t0
after_load = status()
g = torch.Generator().manual_seed(seed)
rows = weight.shape[0]
read_idx = torch.randint(1, rows, (n_rows,), generator=g).tolist()
write_idx = torch.randint(1, rows, (n_rows,), generator=g).tolist()
new_row = torch.randn(weight.shape[1], generator=g)
reads, writes = [], []
acc = 0.0
with torch.no_grad():
    for i in read_idx:
        t = time.perf_counter(); acc += float(weight[i].sum()); reads.append(time.perf_counter() - t)
    after_reads = status()
    for i in write_idx:
        t = time.perf_counter(); weight[i] = new_row; writes.append(time.perf_counter() - t)
    after_writes = status()
    # Check the writes landed (and the reads read real data).
    assert torch.equal(weight[write_idx[-1]], new_row)
print(json.dumps({"mode": mode, "rows": rows, "width": int(weight.shape[1]), "load_s": round(load_s, 3),
                  "before": before, "after_load": after_load, "after_reads": after_reads, "after_writes": after_writes,
                  "row_read_us_median": round(1e6 * statistics.median(reads), 1),
                  "row_write_us_median": round(1e6 * statistics.median(writes), 1),
                  "row_read_us_max": round(1e6 * max(reads), 1), "row_write_us_max": round(1e6 * max(writes), 1),
                  "checksum": acc}))
"""


def write_state(path: Path, users: int, width: int, seed: int = 0) -> int:
    """A safetensors file with a [users + 1, width] float32 table (random rows, row 0 zero, like a real state)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    table = torch.randn(users + 1, width, generator=g) * 0.02
    table[0] = 0
    save_file({TABLE_KEY: table}, str(path))
    return path.stat().st_size


def probe(mode: str, state: Path, table_dir: Path, rows: int, seed: int) -> dict:
    argv = [sys.executable, "-c", _PROBE, str(ROOT), mode, str(state), str(table_dir), str(rows), str(seed)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=100000, help="users in the table (default: %(default)s)")
    ap.add_argument("--width", type=int, default=8 * 576, help="floats per row (default: %(default)s, SmolLM2's L*d)")
    ap.add_argument("--rows", type=int, default=1000, help="random rows read, then written (default: %(default)s)")
    ap.add_argument(
        "--table-dir", type=Path, default=None, help="scratch dir of the paged table (default: a temporary dir)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "paged_table_cpu.json")
    args = ap.parse_args(argv)
    import torch

    with tempfile.TemporaryDirectory(prefix="tapper-paged-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        nbytes = write_state(tmp / "prefix.safetensors", args.users, args.width, args.seed)
        print(
            f"{args.users:,} users x {args.width} floats: state {nbytes / 1e6:.0f} MB written in "
            f"{time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        results = []
        for mode in ("memory", "paged"):
            r = probe(mode, tmp / "prefix.safetensors", args.table_dir or tmp / "table", args.rows, args.seed)
            r.update(users=args.users, state_bytes=nbytes)
            results.append(r)
            a, rd, wr = r["after_load"], r["after_reads"], r["after_writes"]
            print(
                f"{mode:>6}: load {r['load_s']} s; RssAnon/RssFile MB after load {a['RssAnon_mb']}/{a['RssFile_mb']}, "
                f"after {args.rows} reads {rd['RssAnon_mb']}/{rd['RssFile_mb']}, after {args.rows} writes "
                f"{wr['RssAnon_mb']}/{wr['RssFile_mb']}; peak {wr['VmHWM_mb']} MB; row read "
                f"{r['row_read_us_median']} us, write {r['row_write_us_median']} us (medians)",
                flush=True,
            )
    write_results(args.out, "paged_table.py", argv, results, torch=torch.__version__)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
