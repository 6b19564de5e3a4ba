"""Attention case study (paper 4.3, Fig. 3): which history records P_q's attention weighs.

For one query and a trained `TapPer`, α over the user's history is computed
(`TapPer.prefix_for(items, vectors)` returns (P, α)) with the learned
temporal bias and with the bias switched off at inference (λ_t = λ_o = 0 on
the same weights), plus any other trained models passed in (e.g. the
`lambda0` variant trained without bias). The rows are drawn as a heatmap, one
column per history record in chronological order, labelled with the record's
answer field and its age.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from tapper.atomic import atomic_write_json
from tapper.data.types import Example


@contextlib.contextmanager
def temporal_bias_off(model):
    """Switch λ_t and λ_o off on `model` (same weights) inside the block."""
    cfg = model.prefix.cfg
    saved = (cfg.use_lambda_t, cfg.use_lambda_o)
    cfg.use_lambda_t, cfg.use_lambda_o = False, False
    try:
        yield model
    finally:
        cfg.use_lambda_t, cfg.use_lambda_o = saved


@torch.no_grad()
def attention_weights(model, encoder, example: Example) -> list[float]:
    """α over `example`'s history (in the order the encoder keeps, chronological) for one model."""
    model.eval()
    enc = encoder.encode([example], model.user_rows if model.cfg.use_pu else None, progress=False)
    _, alpha = model.prefix_for(enc.items, enc.vectors)
    return [float(a) for a in alpha[0, : len(enc.items[0].hist_rows)]]


@torch.no_grad()
def attention_summary(model, encoder, examples: list[Example], last: int = 5, batch_size: int = 32) -> dict:
    """How concentrated α is over many queries: the mean largest single weight, and the mean
    weight on the `last` most recent records. One query's heatmap can mislead; these cannot."""
    model.eval()
    enc = encoder.encode(examples, model.user_rows if model.cfg.use_pu else None, progress=False)
    top, recent, n = 0.0, 0.0, 0
    for i in range(0, len(enc.items), batch_size):
        items = enc.items[i : i + batch_size]
        _, alpha = model.prefix_for(items, enc.vectors)
        for j, item in enumerate(items):
            k = len(item.hist_rows)
            if k:
                top += float(alpha[j, :k].max())
                recent += float(alpha[j, max(0, k - last) : k].sum())
                n += 1
    return {
        "queries": n,
        "mean_max_alpha": round(top / max(n, 1), 4),
        f"mean_alpha_last{last}": round(recent / max(n, 1), 4),
    }


def summaries(model, encoder, examples: list[Example], others: dict[str, object] | None = None) -> dict[str, dict]:
    """attention_summary for the same rows as the case study: bias on, bias off (same weights), others."""
    out = {"with temporal bias": attention_summary(model, encoder, examples)}
    with temporal_bias_off(model):
        out["same weights, λ_t=λ_o=0"] = attention_summary(model, encoder, examples)
    for name, other in (others or {}).items():
        out[name] = attention_summary(other, encoder, examples)
    return out


def case_study(model, encoder, task, example: Example, others: dict[str, object] | None = None) -> dict:
    """Rows of α: 'with temporal bias', 'bias off (same weights)', and one per model in `others`."""
    rows = {
        f"TAP-PER (λ_t={float(model.prefix.lambda_t.detach()):.2f}, "
        f"λ_o={float(model.prefix.lambda_o.detach()):.2f})": attention_weights(model, encoder, example)
    }
    with temporal_bias_off(model):
        rows["same weights, λ_t=λ_o=0"] = attention_weights(model, encoder, example)
    for name, other in (others or {}).items():
        rows[name] = attention_weights(other, encoder, example)
    keep = encoder.encode([example], None, progress=False).items[0]
    hist = {r.id: r for r in example.history}
    records = [hist[i] for i in keep.history_ids]
    answer = task.target_field
    labels = [f"{(r.fields.get(answer) or r.id)[:18]} (-{int(d)}d)" for r, d in zip(records, keep.dt)]
    return {
        "query_id": example.id,
        "user_id": example.user_id,
        "gold": example.target,
        "input": example.input[-200:],
        "records": [r.id for r in records],
        "labels": labels,
        "dt_days": keep.dt,
        "rows": rows,
    }


def plot_case_study(study: dict, path: str | Path, max_records: int = 40) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(study["rows"])
    n = len(study["labels"])
    start = max(0, n - max_records)  # the most recent records when the history is long
    data = torch.tensor([study["rows"][k][start:] for k in names]).numpy()
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * (n - start) + 3), 1.0 + 0.5 * len(names)))
    im = ax.imshow(data, aspect="auto", cmap="Reds", vmin=0)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xticks(range(n - start))
    ax.set_xticklabels(study["labels"][start:], rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("history records, oldest → most recent" + (f" (last {n - start} of {n})" if start else ""))
    ax.set_title(f"P_q attention for query {study['query_id']} (gold: {study['gold']})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02, label="α")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pick_query(examples: list[Example], predictions: dict[str, dict[str, str]] | None = None) -> Example:
    """A query worth showing: where the full model is right and the bias-free one wrong, else the longest history."""
    if predictions and "tap-per" in predictions and "lambda0" in predictions:
        for ex in examples:
            full, flat = predictions["tap-per"].get(ex.id), predictions["lambda0"].get(ex.id)
            if full == ex.target and flat != ex.target and len(ex.history) >= 3:
                return ex
    return max(examples, key=lambda e: len(e.history))


def case_study_from_run(
    run_dir: str | Path,
    questions,
    outputs,
    task_name: str | None = None,
    variant: str = "tap-per",
    query_id: str | None = None,
    out_dir: str | Path | None = None,
) -> tuple[dict, list[Path]]:
    """Load a `tapper experiment` output directory and write attention.png + attention.json.

    Returns the study (what attention.json holds) and the two files."""
    from tapper.experiment import embedding_cache, prepare_data
    from tapper.model.backbone import load_backbone_dir
    from tapper.model.tapper import TapPer
    from tapper.train.stage2 import encoder_for

    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    data = prepare_data(task_name or metrics["task"], questions, outputs, metrics["config"]["stage2_users"])
    model = TapPer.load(run_dir / "tapper" / variant, load_backbone_dir(run_dir / "stage1").model)
    bb = load_backbone_dir(run_dir / "stage1")
    encoder = encoder_for(model, data.task, bb.tokenizer, embedding_cache(bb))
    others = {}
    if variant == "tap-per" and (run_dir / "tapper" / "lambda0").exists():
        others["trained without bias (lambda0)"] = TapPer.load(
            run_dir / "tapper" / "lambda0", load_backbone_dir(run_dir / "stage1").model
        )
    preds = {}
    for v in ("tap-per", "lambda0"):
        p = run_dir / "predictions" / f"{v}.json"
        if p.exists():
            preds[v] = {g["id"]: g["output"] for g in json.loads(p.read_text())["golds"]}
    examples = data.splits.eval
    ex = next(e for e in examples if e.id == query_id) if query_id else pick_query(examples, preds)
    study = case_study(model, encoder, data.task, ex, others)
    study["over_all_queries"] = summaries(model, encoder, examples, others)
    study["predictions"] = {v: p.get(ex.id) for v, p in preds.items()}
    out = Path(out_dir or run_dir / "report")
    png = plot_case_study(study, out / "attention.png")
    js = atomic_write_json(out / "attention.json", study)
    return study, [png, js]
