"""Training throughput of Stage 1 and Stage 2: tokens/s, step time and model FLOPs utilisation (MFU).

    python bench/throughput.py [--backbone tiny|smollm2] [--random-init CONFIG] [--stage 1,2] [--batch 8] [--seq 256]
                               [--history 32] [--dtype fp32|bf16|fp16] [--checkpointing] [--micro N] [--steps 5]
                               [--threads N] [--out bench/results/throughput_<backbone>_<device>.json]

The workload is tapper.plan.workload: the real Stage-1 (task LoRA) or Stage-2 (TapPer: prefix encoder + bridge
on the frozen backbone) training step through tapper.train.loop, on random weights and random token ids of
exactly --seq tokens. `--random-init CONFIG` takes the backbone, batch size and max_len of a run config
(configs/llama3.1-8b-*.yaml, ...) and builds that backbone from its config with random weights (no download),
so the same command measures a GPU when one is there (it runs on $TAPPER_DEVICE / the first GPU).

MFU = model FLOPs per second / the peak matmul throughput measured in the same run (a square matmul in the
step's dtype, best of a few). Model FLOPs of a step: forward 2·N·tokens and backward to the activations
2·N·tokens, N = the decoder's and head's matmul weights (the frozen backbone computes no weight gradients; the
LoRAs' and prefix encoder's own FLOPs are < 1 % and left out), plus attention's 4·T·d per token and layer in the
forward, twice that in the backward. Recomputation under checkpointing is not counted (it is overhead, not
model work), as is the convention for MFU.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from tapper.atomic import atomic_write_json  # noqa: E402
from tapper.precision import torch_dtype  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: str, n: int, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` timed n x n matmuls (a few warm-up ones first)."""
    dt = torch_dtype(dtype)
    a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
    for _ in range(2):
        a @ b
    sync(device)
    best = float("inf")
    inner = 10 if device.type == "cuda" else 1
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t0) / inner)
    return 2 * n**3 / best


def model_flops(config, tokens: int, seq: int) -> float:
    d, layers = int(config.hidden_size), int(config.num_hidden_layers)
    ffn = int(config.intermediate_size)
    heads, kv = (
        int(config.num_attention_heads),
        int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads),
    )
    head_dim = int(getattr(config, "head_dim", None) or d // heads)
    per_layer = d * heads * head_dim * 2 + d * kv * head_dim * 2 + 3 * d * ffn  # q,o + k,v + gate,up,down
    n = layers * per_layer
    attention = layers * 4 * seq * heads * head_dim  # QK^T and AV, per token (forward)
    # Forward 2N + backward-to-activations 2N per token; attention forward + twice in the backward. The head runs
    # on the target tokens only (half the sequence): 2 + 2 FLOPs per weight and target token.
    head = int(config.vocab_size) * d
    return tokens * (4 * n + 3 * attention) + (tokens // 2) * 4 * head


def run(args, stage: int, device: torch.device) -> dict:
    from tapper.plan.workload import build_workload
    from tapper.train.loop import train_epochs

    steps = args.warmup + args.steps
    w = build_workload(
        args.backbone,
        stage,
        args.batch,
        args.seq,
        args.history,
        args.dtype,
        args.checkpointing,
        args.micro,
        device=device,
        n_items=steps * args.batch,
    )
    times: list[float] = []
    last = [time.perf_counter()]

    def on_step(step: int, loss: float) -> None:  # the loop has synced already (it reads the loss)
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    last[0] = time.perf_counter()
    train_epochs(
        w.items, w.loss_fn, w.groups, epochs=1, batch_size=args.batch, on_step=on_step, progress=False, **w.loop_kwargs
    )
    timed = sorted(times[args.warmup :])
    step_s = timed[len(timed) // 2]  # median
    tokens = args.batch * args.seq
    flops = model_flops(w.config, tokens, args.seq)
    out = {
        "stage": stage,
        "step_s": round(step_s, 4),
        "step_s_all": [round(t, 4) for t in times],
        "tokens_per_s": round(tokens / step_s, 1),
        "model_flops_per_step": flops,
        "model_flops_per_s": flops / step_s,
    }
    if device.type == "cuda":
        out["peak_memory"] = torch.cuda.max_memory_allocated(device)
        plan = w.plan()
        out["plan_peak"] = plan.peak()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="tiny")
    ap.add_argument(
        "--random-init", metavar="CONFIG", help="a run config: its backbone, batch size, max_len and memory settings"
    )
    ap.add_argument("--stage", default="1,2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--history", type=int, default=32)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--micro", type=int, default=None)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--matmul", type=int, default=None, help="matmul size for the peak (default 2048 CPU, 8192 GPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.random_init:
        from tapper.plan.cli import load_config_file

        backbone, cfg = load_config_file(args.random_init)
        args.backbone, args.batch, args.seq = (
            backbone,
            cfg.stage2.micro_batch_size or cfg.stage2.batch_size,
            cfg.stage2.max_len,
        )
        args.dtype, args.checkpointing = cfg.stage2.dtype, cfg.stage2.gradient_checkpointing
    from tapper.model.backbone import default_device

    device = default_device()
    peak = matmul_peak(device, args.dtype, args.matmul or (8192 if device.type == "cuda" else 2048))
    stages = [run(args, int(s), device) for s in args.stage.split(",")]
    for s in stages:
        s["mfu"] = round(s["model_flops_per_s"] / peak, 4)
    name = args.backbone.split("/")[-1]
    res = {
        "backbone": args.backbone,
        "random_init": args.random_init,
        "device": str(device),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        },
        "settings": {
            k: getattr(args, k)
            for k in ("batch", "seq", "history", "dtype", "checkpointing", "micro", "steps", "warmup")
        },
        "matmul_peak_flops": peak,
        "stages": stages,
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"throughput_{name}_{device.type}.json")
    atomic_write_json(out, res)
    for s in stages:
        print(
            f"stage {s['stage']}: {s['step_s']:.3f} s/step, {s['tokens_per_s']:.0f} tokens/s, MFU {s['mfu']:.1%} "
            f"of a measured {peak / 1e9:.1f} GFLOP/s matmul peak"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
