"""Per-user training time as a user's history grows (paper 4.4, Fig. 4 bottom), measured.

For one user with n history records (n Stage-2-style examples, each seeing
the records before it) we time what each method must train *for that user*:

- OPPU: a fresh LoRA (r=8 on q_proj, v_proj) on the merged backbone;
- TAP-PER: only that user's row of the user table E (the shared P_q network
  and bridge are already trained and stay fixed), i.e. Online-Emb's update;
- P_q-only: nothing (0 s: it has no per-user parameters to train).

Same examples, epochs, batch size and optimizer for both; wall-clock seconds
of the optimisation loop only (tokenization and vector caching excluded,
they are shared by all methods). The data is a synthetic LaMP-2N user so the
benchmark needs no files.
"""

from __future__ import annotations

import datetime as dt
import random
import time
from pathlib import Path

import torch

from tapper.config import Stage2Config
from tapper.data.splits import record_examples
from tapper.data.tasks import get_task
from tapper.data.types import Record

TASK = get_task("LaMP_2N")
WORDS = (
    "market team recipe vote school flight court film church gene diet style election storm museum "
    "startup league vaccine festival budget"
).split()


def synthetic_history(n: int, user: str = "u0", seed: int = 0) -> list[Record]:
    rng = random.Random(seed)
    labels = list(TASK.labels)
    fav = rng.choice(labels)
    day = dt.date(2020, 1, 1)
    out = []
    for j in range(n):
        cat = fav if rng.random() < 0.7 else rng.choice(labels)
        text = " ".join(rng.choice(WORDS) for _ in range(24))
        day += dt.timedelta(days=rng.randint(1, 9))
        out.append(Record(id=f"{user}-{j}", fields={"text": text, "title": text[:30], "category": cat}, date=day))
    return out


def _texts(histories) -> list[str]:
    texts = []
    for h in histories:
        for ex in record_examples("u", h, TASK):
            texts += [TASK.prompt(ex.input) + TASK.format_target(ex.target)]
        texts += [TASK.record_text(r) for r in h]
    return texts + list(TASK.labels)


def _best_of(repeats: int, run) -> float:
    """Minimum wall time over `repeats` runs (the least disturbed by other load on a shared machine)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return min(times)


def time_user_training(
    backbone_spec: str = "tiny",
    lengths=(8, 16, 32, 64),
    epochs: float = 1,
    batch_size: int = 8,
    max_len: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    threads: int | None = None,
    repeats: int = 2,
) -> dict:
    from tapper.methods.oppu import lora_parameters
    from tapper.experiment import embedding_cache
    from tapper.model.backbone import load_backbone, load_backbone_dir
    from tapper.model.lora import attach_lora
    from tapper.model.prefixed_lm import PrefixedLM
    from tapper.model.tapper import TapPer
    from tapper.train.features import FeatureEncoder, lm_train_batch
    from tapper.train.loop import set_seed, train_epochs
    from tapper.train.stage2 import encoder_for, fit

    if threads:
        torch.set_num_threads(threads)
    histories = {n: synthetic_history(n, seed=seed + n) for n in lengths}
    bb = load_backbone(backbone_spec, texts=_texts(histories.values()) if backbone_spec == "tiny" else None, seed=seed)
    rows = []
    # Warm-up (first-call allocations and kernel selection) on the smallest history, not recorded.
    for i, (n, hist) in enumerate([(lengths[0], histories[lengths[0]]), *histories.items()]):
        examples = record_examples("u0", hist, TASK)
        # OPPU: a fresh adapter on the backbone, trained on this user's examples.
        fresh = load_backbone_dir(bb.path)
        set_seed(seed)
        peft = attach_lora(fresh.model, 8, 8, 0.05, ["q_proj", "v_proj"])
        plm = PrefixedLM(peft)
        enc = FeatureEncoder(TASK, fresh.tokenizer, cache=None, max_len=max_len)
        items = []
        for ex in examples:
            from tapper.train.stage1 import TokenExample

            p, t = enc.tokenize(ex.input, ex.target)
            items.append(TokenExample(ex.id, p, t))
        params = list(lora_parameters(peft).values())
        pad = fresh.tokenizer.pad_token_id
        peft.train()
        oppu_s = _best_of(
            repeats,
            lambda: train_epochs(
                items,
                lambda b: plm.loss(lm_train_batch(b, pad)),
                [{"params": params, "lr": lr}],
                epochs,
                batch_size,
                seed=seed,
                progress=False,
            ),
        )
        peft = plm = fresh = None  # frees the models before the next one loads (the lambdas above have run)

        # TAP-PER: the user's row of E only; shared prefix network + bridge frozen (already trained).
        fresh = load_backbone_dir(bb.path)
        cfg = Stage2Config(max_len=max_len, batch_size=batch_size, lr=lr)
        set_seed(seed)
        model = TapPer(fresh.model, ["u0"], cfg)
        encoded = encoder_for(model, TASK, fresh.tokenizer, embedding_cache(fresh)).encode(
            examples, model.user_rows, progress=False
        )
        # Only E gets gradients: the shared P_q network and bridge are frozen for a per-user update.
        for name, p in model.named_parameters():
            p.requires_grad_(name == "prefix.user_table.weight")
        tapper_s = _best_of(
            repeats,
            lambda: fit(
                model, encoded, fresh.tokenizer.pad_token_id, cfg, epochs, seed, which=("user_table",), progress=False
            ),
        )
        model = fresh = None
        if i == 0:
            continue  # the warm-up pass
        rows.append(
            {
                "history": n,
                "examples": len(examples),
                "oppu_s": round(oppu_s, 4),
                "tapper_s": round(tapper_s, 4),
                "pq_only_s": 0.0,
            }
        )
    return {
        "backbone": backbone_spec,
        "epochs": epochs,
        "batch_size": batch_size,
        "max_len": max_len,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "note": "seconds of the per-user optimisation loop; TAP-PER trains only the user's row of E (shared parts "
        "fixed); "
        "P_q-only has no per-user parameters, so no per-user training",
    }


def plot_timing(results: dict | list[dict], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = results if isinstance(results, list) else [results]
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, res in zip(axes[0], results):
        xs = [r["history"] for r in res["rows"]]
        ax.plot(xs, [r["oppu_s"] for r in res["rows"]], "o-", color="tab:blue", label="OPPU (LoRA per user)")
        ax.plot(xs, [r["tapper_s"] for r in res["rows"]], "o-", color="tab:red", label="TAP-PER (P_u row only)")
        ax.plot(
            xs, [r["pq_only_s"] for r in res["rows"]], "--", color="tab:green", label="P_q-only (no per-user training)"
        )
        ax.set_xlabel("history length (records = training examples)")
        ax.set_ylabel(f"seconds per user ({res['epochs']} epoch(s), CPU x{res['threads']})")
        ax.set_title(f"per-user training time, {res['backbone']}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
