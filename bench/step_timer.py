"""One training-step timing, using only APIs that the code before issue 21 has too (run by bench/throughput_vs.py
with PYTHONPATH pointing at either checkout). Prints one JSON line: seconds per step over --steps steps after one
warm-up step, on a random-init backbone (tapper.analysis.footprint.backbone_config) and random token ids.

--stage 2: TapPer (prefix encoder + bridge LoRA on the frozen backbone), --history records per example.
--stage 1: the task LoRA on q, k, v, o (Stage1Config's defaults), no prefix.
--profile FILE: also run torch.profiler over the timed steps and write where the CPU time went (new code only).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def stage2(a, model):
    from tapper.config import Stage2Config
    from tapper.model.tapper import TapPer
    from tapper.train.stage2 import param_groups

    s2 = Stage2Config(batch_size=a.batch, max_len=a.seq, bridge_dropout=0.0)
    tp = TapPer(model, [f"u{i}" for i in range(4)], s2)
    vectors = torch.randn(a.history + 1, tp.d)
    tp.train()
    return s2.prefix_len, (lambda batch: tp.loss(batch, vectors, 0)), (lambda: param_groups(tp, s2))


def stage1(a, model):
    from tapper.model.lora import attach_lora
    from tapper.model.prefixed_lm import PrefixedLM
    from tapper.train.features import lm_train_batch

    lm = attach_lora(model, 8, 8, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj"])
    plm = PrefixedLM(lm)
    lm.train()
    params = [p for p in lm.parameters() if p.requires_grad]
    return 0, (lambda batch: plm.loss(lm_train_batch(batch, 0))), (lambda: [{"params": params, "lr": 1e-4}])


def profile_table(prof, top: int = 25) -> dict:
    """Self CPU time per op (the top ones) and per kind of work, as shares of the profiled time."""
    rows = [(e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages()]
    total = sum(r[1] for r in rows) or 1.0

    def kind(name: str) -> str:
        if name.startswith("Optimizer."):
            return "optimizer"
        if name.startswith("autograd::engine"):
            return "autograd engine"
        op = name.split("::")[-1].lower().rstrip("_")
        if op in ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear"):
            return "matmul"
        if "scaled_dot_product" in op or "softmax" in op:
            return "attention"
        if op.startswith("_foreach") or op in ("addcdiv", "addcmul", "lerp", "sqrt", "linalg_vector_norm", "norm"):
            return "optimizer"
        if op in (
            "copy",
            "to",
            "_to_copy",
            "cat",
            "index",
            "index_select",
            "gather",
            "scatter",
            "embedding",
            "embedding_dense_backward",
            "clone",
            "contiguous",
            "stack",
            "fill",
            "zero",
            "zeros",
            "empty",
            "empty_strided",
            "ones",
            "new_zeros",
            "index_put",
            "masked_fill",
            "_index_put_impl",
        ):
            return "copies/indexing"
        return "elementwise/other"

    by_kind: dict[str, float] = {}
    for name, t, _ in rows:
        by_kind[kind(name)] = by_kind.get(kind(name), 0.0) + t
    rows.sort(key=lambda r: -r[1])
    return {
        "total_self_cpu_s": total / 1e6,
        "by_kind": {k: round(v / total, 4) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_ops": [
            {"op": n, "self_cpu_s": round(t / 1e6, 4), "share": round(t / total, 4), "calls": c}
            for n, t, c in rows[:top]
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="smollm2")
    ap.add_argument("--stage", type=int, default=2, choices=(1, 2))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--history", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import tapper
    from transformers import AutoModelForCausalLM

    from tapper.analysis.footprint import backbone_config
    from tapper.train.features import EncodedExample
    from tapper.train.loop import train_epochs

    torch.manual_seed(0)
    config = backbone_config(a.backbone)
    model = AutoModelForCausalLM.from_config(config)
    prefix_len, loss_fn, groups = (stage2 if a.stage == 2 else stage1)(a, model)
    room = a.seq - prefix_len
    n_tgt = room // 2
    hist = a.history if a.stage == 2 else 0
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range((a.steps + 1) * a.batch):
        ids = torch.randint(4, int(config.vocab_size), (room,), generator=g).tolist()
        items.append(
            EncodedExample(
                id=str(i),
                user_id=f"u{i % 4}",
                user_row=1 + i % 4,
                q_row=0,
                hist_rows=list(range(1, hist + 1)),
                dt=[1.0] * hist,
                dpi=[1.0] * hist,
                prompt_ids=ids[: room - n_tgt],
                target_ids=ids[room - n_tgt :],
                target=None,
            )
        )
    train_epochs(items[: a.batch], loss_fn, groups(), epochs=1, batch_size=a.batch, progress=False)  # warm-up
    load = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    train_epochs(items[a.batch :], loss_fn, groups(), epochs=1, batch_size=a.batch, progress=False)
    step = (time.perf_counter() - t0) / a.steps
    # CPU seconds of this process per step: on a shared machine wall time also counts the waits for a core.
    cpu = (time.process_time() - c0) / a.steps
    out = {
        "code": os.path.dirname(os.path.dirname(tapper.__file__)),
        "stage": a.stage,
        "step_s": step,
        "tokens_per_s": a.batch * a.seq / step,
        "step_cpu_s": cpu,
        "load_1min": [load, os.getloadavg()[0]],
    }
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train_epochs(items[a.batch :], loss_fn, groups(), epochs=1, batch_size=a.batch, progress=False)
        with open(a.profile, "w") as f:
            json.dump({"stage": a.stage, "steps": a.steps, **profile_table(prof)}, f, indent=1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
