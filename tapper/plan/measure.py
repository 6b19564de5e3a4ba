"""Measured peak memory of one training step on the CPU, to check the plan (tapper.plan.plan) against.

How it measures: the step runs in a fresh process (`python -m tapper.plan.measure ...`, one JSON line out) on a
random-init backbone built from the config (no weights needed). After a first step (which creates the optimizer's
state), the kernel's peak-RSS counter is reset (`echo 5 > /proc/self/clear_refs`, Linux ≥ 4.0) with glibc's free
memory handed back first (`malloc_trim`), the resident size is read (VmRSS), a second step runs, and the peak is
read back (VmHWM). Peak minus baseline is what the step added on top of weights, gradients and optimizer state
already resident: its activations and the backward's working set, i.e. the plan's `activations + workspace`.
The process runs with `MALLOC_MMAP_THRESHOLD_=65536`: glibc then maps every block of 64 KiB or more on its own
and unmaps it on free, so a freed tensor leaves the resident set at once; with glibc's default (a threshold that
grows to 32 MiB) freed tensors stay in the heap and the peak RSS of the same step read 2.2x the live bytes
(fragmentation, not tensors). tracemalloc would see none of it (torch allocates outside Python's allocator), and
torch keeps no allocator
statistics for the CPU; resident memory is what the machine actually had to provide. It can only over-count
(pages glibc keeps after a free are still resident), never miss an allocation that was touched.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> int:
    """Return free heap pages to the OS, reset the peak-RSS counter; returns the resident bytes now."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: nothing to trim
        pass
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    return _status_kib("VmHWM") * 1024


def run_step(
    backbone: str, stage: int, b: int, seq: int, history: int, dtype: str, checkpointing: bool, micro: int | None
) -> dict:
    """Two training steps of `stage` on a random-init `backbone`; the second one's peak over its baseline."""
    from tapper.plan.workload import build_workload
    from tapper.train.loop import train_epochs

    w = build_workload(backbone, stage, b, seq, history, dtype, checkpointing, micro, device="cpu")
    plan = w.plan()
    marks: dict[str, int] = {}

    def after(step: int, loss: float) -> None:
        if step == 0:
            marks["baseline"] = reset_peak()

    train_epochs(
        w.items[: 2 * b], w.loss_fn, w.groups, epochs=1, batch_size=b, on_step=after, progress=False, **w.loop_kwargs
    )
    peak = peak_rss()
    act, ws = (plan.activations_ckpt, plan.workspace_ckpt) if checkpointing else (plan.activations, plan.workspace)
    return {
        "backbone": backbone,
        "stage": stage,
        "batch": b,
        "seq": seq,
        "history": history,
        "dtype": dtype,
        "checkpointing": checkpointing,
        "micro_batch": micro,
        "baseline_rss": marks["baseline"],
        "peak_rss": peak,
        "measured": peak - marks["baseline"],
        "planned": act + ws,
        "plan": {"activations": act, "workspace": ws},
    }


def measure_in_subprocess(**kwargs) -> dict:
    """`run_step` in a fresh process, so nothing earlier in this one raises or hides its peak."""
    args = [sys.executable, "-m", "tapper.plan.measure"]
    for k, v in kwargs.items():
        if isinstance(v, bool):
            args += [f"--{k}"] if v else []
        elif v is not None:
            args += [f"--{k}", str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(args, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="peak memory of one training step on the CPU (JSON on stdout)")
    p.add_argument("--backbone", default="tiny")
    p.add_argument("--stage", type=int, choices=(1, 2), default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--history", type=int, default=32)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--micro", type=int, default=None)
    a = p.parse_args(argv)
    res = run_step(a.backbone, a.stage, a.batch, a.seq, a.history, a.dtype, a.checkpointing, a.micro)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
