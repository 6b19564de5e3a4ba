"""One Stage-2 timing, using only APIs that the code before issue 21 has too (run by bench/throughput_vs.py with
PYTHONPATH pointing at either checkout). Prints one JSON line: seconds per step over --steps steps after one
warm-up step, on a random-init backbone (tapper.analysis.footprint.backbone_config) and random token ids."""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="smollm2")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--history", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import tapper
    from transformers import AutoModelForCausalLM

    from tapper.analysis.footprint import backbone_config
    from tapper.config import Stage2Config
    from tapper.model.tapper import TapPer
    from tapper.train.features import EncodedExample
    from tapper.train.loop import train_epochs
    from tapper.train.stage2 import param_groups

    torch.manual_seed(0)
    config = backbone_config(a.backbone)
    model = AutoModelForCausalLM.from_config(config)
    s2 = Stage2Config(batch_size=a.batch, max_len=a.seq, bridge_dropout=0.0)
    tp = TapPer(model, [f"u{i}" for i in range(4)], s2)
    vectors = torch.randn(a.history + 1, tp.d)
    room = a.seq - s2.prefix_len
    n_tgt = room // 2
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range((a.steps + 1) * a.batch):
        ids = torch.randint(4, int(config.vocab_size), (room,), generator=g).tolist()
        items.append(EncodedExample(id=str(i), user_id=f"u{i % 4}", user_row=1 + i % 4, q_row=0,
                                    hist_rows=list(range(1, a.history + 1)), dt=[1.0] * a.history,
                                    dpi=[1.0] * a.history, prompt_ids=ids[: room - n_tgt], target_ids=ids[room - n_tgt :],
                                    target=None))
    tp.train()
    groups = param_groups(tp, s2)
    loss_fn = lambda batch: tp.loss(batch, vectors, 0)  # noqa: E731
    train_epochs(items[: a.batch], loss_fn, groups, epochs=1, batch_size=a.batch, progress=False)  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    train_epochs(items[a.batch :], loss_fn, param_groups(tp, s2), epochs=1, batch_size=a.batch, progress=False)
    step = (time.perf_counter() - t0) / a.steps
    # CPU seconds of this process per step: on a shared machine wall time also counts the waits for a core.
    cpu = (time.process_time() - c0) / a.steps
    print(json.dumps({"code": os.path.dirname(os.path.dirname(tapper.__file__)), "step_s": step,
                      "tokens_per_s": a.batch * a.seq / step, "step_cpu_s": cpu}))


if __name__ == "__main__":
    main()
