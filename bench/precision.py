"""bf16 + gradient checkpointing against fp32: the same training run's loss curve, and one step's peak memory.

    python bench/precision.py [--stages 1,2] [--batch 8] [--steps 52] [--seq 128] [--history 16]
                              [--out bench/results/precision_tiny_cpu.json]

Loss curves: Stage 1 (task LoRA) and Stage 2 (prefix + bridge) trained for --steps optimizer steps on the
embedded news data (tapper/resources/default, LaMP-2N) on the tiny backbone, twice from the same seed and
weights: fp32, and a bf16 backbone with gradient checkpointing (trainable weights stay fp32 in both,
tapper.precision). Recorded: both curves and the largest per-step relative difference. Memory: the peak resident
memory one training step adds over its baseline in each setting (tapper.plan.measure, a fresh process per
setting, random-init tiny backbone, batch --batch x --seq tokens, --history records per Stage-2 example).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_io import write_results  # noqa: E402
from tapper.plan.measure import measure_in_subprocess  # noqa: E402

SETTINGS = {"fp32": ("fp32", False), "bf16+checkpointing": ("bf16", True)}
LR = 1e-3  # what tests/test_precision.py trains with
DEFAULT = Path(__file__).resolve().parents[1] / "tapper" / "resources" / "default"  # the embedded LaMP-2N news data


def news_and_tiny_backbone():
    """The embedded news data, split, and the tiny backbone every setting starts from (same weights, tokenizer)."""
    from tapper.experiment import open_backbone, prepare_data

    data = prepare_data(None, DEFAULT / "questions.json", DEFAULT / "outputs.json", stage2_users=25)
    return data, open_backbone("tiny", data, seed=0).path


def loss_curve(data, base: Path, stage: int, batch: int, steps: int, dtype: str, ckpt: bool, work: Path) -> list[float]:
    """Per-step losses of `steps` optimizer steps of `stage` on `data` from the backbone at `base`, seed 0."""
    import math

    from tapper.config import Stage1Config, Stage2Config
    from tapper.model.backbone import load_backbone_dir
    from tapper.model.shared_cache import cache_for
    from tapper.train.stage1 import train_stage1
    from tapper.train.stage2 import train_stage2

    bb = load_backbone_dir(base, dtype=dtype)
    examples = data.splits.stage1_train if stage == 1 else data.splits.stage2_train
    epochs = steps / math.ceil(len(examples) / batch)
    losses: list[float] = []
    step = lambda s, loss: losses.append(float(loss))  # noqa: E731
    if stage == 1:
        cfg = Stage1Config(
            epochs=epochs,
            lr=LR,
            batch_size=batch,
            max_len=128,
            lora_dropout=0.0,
            dtype=dtype,
            gradient_checkpointing=ckpt,
        )
        train_stage1(bb, data.task, examples, cfg, work / f"s1-{dtype}-{ckpt}", seed=0, progress=False, on_step=step)
    else:
        cfg = Stage2Config(
            epochs=epochs,
            lr=LR,
            batch_size=batch,
            max_len=128,
            bridge_dropout=0.0,
            dtype=dtype,
            gradient_checkpointing=ckpt,
        )
        train_stage2(
            bb.model,
            bb.tokenizer,
            data.task,
            examples,
            data.splits.stage2_users,
            cfg,
            cache_for(bb, work / "embeddings"),
            seed=0,
            progress=False,
            on_step=step,
        )
    return losses[:steps]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default="1,2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--history", type=int, default=16)
    ap.add_argument("--steps", type=int, default=52)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "precision_tiny_cpu.json"))
    args = ap.parse_args(argv)
    results = []
    data, base = news_and_tiny_backbone()
    for stage in [int(s) for s in args.stages.split(",")]:
        t0 = time.time()
        with tempfile.TemporaryDirectory(prefix="tapper-precision-") as work:
            curves = {
                name: loss_curve(data, base, stage, args.batch, args.steps, dt, ck, Path(work))
                for name, (dt, ck) in SETTINGS.items()
            }
        fp32, low = curves["fp32"], curves["bf16+checkpointing"]
        rel = [abs(a - b) / abs(b) for a, b in zip(low, fp32)]
        peaks = {
            name: measure_in_subprocess(
                backbone="tiny",
                stage=stage,
                batch=args.batch,
                seq=args.seq,
                history=args.history,
                dtype=dt,
                checkpointing=ck,
            )["measured"]
            for name, (dt, ck) in SETTINGS.items()
        }
        row = {
            "stage": stage,
            "steps": len(fp32),
            "loss_first": fp32[0],
            "loss_last": fp32[-1],
            "max_rel_diff": max(rel),
            "mean_rel_diff": sum(rel) / len(rel),
            "step_peak_bytes": peaks,
            "peak_ratio": peaks["bf16+checkpointing"] / peaks["fp32"],
            "curves": curves,
            "seconds": round(time.time() - t0, 1),
        }
        results.append(row)
        print(
            f"stage {stage}: loss {fp32[0]:.3f} -> {fp32[-1]:.3f} over {len(fp32)} steps; bf16+checkpointing at most "
            f"{max(rel):.3%} from fp32; one step's peak {peaks['fp32'] / 2**20:.1f} -> "
            f"{peaks['bf16+checkpointing'] / 2**20:.1f} MiB"
        )
    write_results(
        Path(args.out),
        "precision.py",
        argv,
        results,
        backbone="tiny",
        batch=args.batch,
        seq=args.seq,
        history=args.history,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
