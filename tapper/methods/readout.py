"""Reference rows: what a user's history holds for the task, read without the prefix-to-LM path.

These are yardsticks, not methods we ship. Each scores every label of the
task's label list for a query as

    score(c) = log p_LM(c | query) + w · user(c)

where p_LM is the Stage-1 merged backbone's probability of answering `c`
(every token of the label, as the models generate it), and user(c) comes
from the user's history only:

    ref-count         log of the label's smoothed share of the whole history
    ref-count-lastK   the same over the K most recent records
    ref-ridge         a ridge readout of the uniformly pooled history vector (the
                      cached record vectors TAP-PER's P_q reads, standardized as P_q
                      reads them), fitted on the Stage-2 training examples to score
                      the label each one answered

The weight w is fitted on a sample of the Stage-2 training examples (the best
accuracy, or MAE for LaMP-3, over a fixed grid). So every reference row uses
the same split, the same Stage-1 backbone and the same cached vectors as
TAP-PER; a learned prefix that falls below them loses signal on the way from
the history to the answer. Defined for tasks with a label list (LaMP-1, 2N,
2M, 3); a generation task has none.
"""

from __future__ import annotations

import random
import re
import time

import numpy as np
import torch
import torch.nn.functional as F

from tapper.data.types import Example
from tapper.methods.registry import Method
from tapper.train.features import EncodedExample, FeatureEncoder, lm_train_batch

PATTERN = re.compile(r"ref-(count(?:-last(\d+))?|ridge)")
WEIGHTS = (0.0, 0.1, 0.2, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0)
FIT_EXAMPLES = 400  # Stage-2 training examples w is fitted on (sampled, seeded)
RIDGE = 1.0


@torch.no_grad()
def label_logprobs(model, tokenizer, task, examples: list[Example], max_len: int, batch_labels: int = 64) -> np.ndarray:
    """[n, |labels|]: the backbone's log-probability of each label's full answer (target tokens + EOS)."""
    enc = FeatureEncoder(task, tokenizer, cache=None, max_len=max_len)
    labels = list(task.labels)
    out = np.zeros((len(examples), len(labels)))
    device = next(model.parameters()).device
    model.eval()
    per = max(1, batch_labels // len(labels))
    for start in range(0, len(examples), per):
        chunk = examples[start : start + per]
        items = []
        for ex in chunk:
            for label in labels:
                p, t = enc.tokenize(ex.input, label)
                items.append(EncodedExample(ex.id, ex.user_id, 0, 0, [], [], [], p, t, label))
        b = lm_train_batch(items, tokenizer.pad_token_id)
        logits = model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device)).logits.float()
        lp = F.log_softmax(logits[:, :-1], -1)
        y = b.labels[:, 1:].to(device)
        keep = y != -100
        tok = lp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
        out[start : start + len(chunk)] = tok.sum(1).view(len(chunk), len(labels)).cpu().numpy()
    return out


def count_scores(task, examples: list[Example], last: int | None) -> np.ndarray:
    """log smoothed share of each label among the (last `last`) history records' answers."""
    labels = list(task.labels)
    index = {label: i for i, label in enumerate(labels)}
    out = np.zeros((len(examples), len(labels)))
    for n, ex in enumerate(examples):
        hist = ex.history[-last:] if last else ex.history
        counts = np.ones(len(labels))  # add-one smoothing: an unseen label is possible, not impossible
        for r in hist:
            v = r.fields.get(task.target_field) if task.target_field else None
            if v in index:
                counts[index[v]] += 1
        out[n] = np.log(counts / counts.sum())
    return out


def pooled_history(task, examples: list[Example], cache) -> np.ndarray:
    """Each history's uniform mean of record vectors, centred on the records' mean and unit-RMS per record."""
    texts = sorted({task.record_text(r) for ex in examples for r in ex.history})
    if not texts:
        return np.zeros((len(examples), cache.dim))
    vecs = cache.encode(texts, progress=False).float()
    centred = vecs - vecs.mean(0)
    normed = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-12)
    row = {t: i for i, t in enumerate(texts)}
    out = np.zeros((len(examples), normed.shape[1]))
    for n, ex in enumerate(examples):
        if ex.history:
            out[n] = normed[[row[task.record_text(r)] for r in ex.history]].mean(0).numpy()
    return out


def fit_ridge(X: np.ndarray, Y: np.ndarray, lam: float = RIDGE) -> np.ndarray:
    Xa = np.c_[X, np.ones(len(X))]
    return np.linalg.solve(Xa.T @ Xa + lam * np.eye(Xa.shape[1]), Xa.T @ Y)


def apply_ridge(W: np.ndarray, X: np.ndarray) -> np.ndarray:
    return np.c_[X, np.ones(len(X))] @ W


def choose(task, lm: np.ndarray, user: np.ndarray, w: float) -> list[str]:
    labels = list(task.labels)
    return [labels[int(i)] for i in (lm + w * user).argmax(1)]


def fit_weight(task, lm: np.ndarray, user: np.ndarray, golds: list[str]) -> float:
    """The grid weight with the best primary metric on the fitting examples (ties: the smaller weight)."""
    from tapper.eval.metrics import compute_metrics

    ids = [str(i) for i in range(len(golds))]
    best, best_w = None, 0.0
    for w in WEIGHTS:
        preds = dict(zip(ids, choose(task, lm, user, w)))
        value = compute_metrics(task, preds, dict(zip(ids, golds)))[task.primary_metric]
        better = value if task.higher_is_better else -value
        if best is None or better > best + 1e-12:
            best, best_w = better, w
    return best_w


def readout_predictions(
    variant: str, model, tokenizer, cache, task, train: list[Example], evals: list[Example], max_len: int, seed: int = 0
) -> tuple[dict[str, str], dict]:
    m = PATTERN.fullmatch(variant)
    if m is None:
        raise ValueError(f"{variant!r} is not a reference row (ref-count, ref-count-lastK, ref-ridge)")
    if not task.labels or not task.target_field:
        raise ValueError(
            f"{variant}: reference rows need a task with a label list and answers in the history; {task.name} has none"
        )
    fit = [ex for ex in train if ex.history and ex.target is not None]
    fit = random.Random(seed).sample(fit, min(FIT_EXAMPLES, len(fit)))
    if not fit:
        raise ValueError(f"{variant}: no Stage-2 training example with a history to fit on")
    lm_fit = label_logprobs(model, tokenizer, task, fit, max_len)
    lm_eval = label_logprobs(model, tokenizer, task, evals, max_len)
    if m.group(1) == "ridge":
        everything = [ex for ex in train if ex.history and ex.target in task.labels]
        X = pooled_history(task, everything + fit + evals, cache)
        n = len(everything)
        Y = np.eye(len(task.labels))[[list(task.labels).index(ex.target) for ex in everything]]
        W = fit_ridge(X[:n], Y)
        user_fit, user_eval = apply_ridge(W, X[n : n + len(fit)]), apply_ridge(W, X[n + len(fit) :])
    else:
        last = int(m.group(2)) if m.group(2) else None
        user_fit, user_eval = count_scores(task, fit, last), count_scores(task, evals, last)
    w = fit_weight(task, lm_fit, user_fit, [ex.target for ex in fit])
    preds = dict(zip([ex.id for ex in evals], choose(task, lm_eval, user_eval, w)))
    return preds, {"weight": w, "fit_examples": len(fit)}


def run_readout(variant, stage1_dir, data, cfg, out_dir, progress=True, log=None):
    from tapper.methods.result import VariantResult, score
    from tapper.model.shared_cache import cache_for
    from tapper.model.backbone import load_backbone_dir

    t0 = time.time()
    bb = load_backbone_dir(stage1_dir)
    preds, extra = readout_predictions(
        variant,
        bb.model,
        bb.tokenizer,
        cache_for(bb),
        data.task,
        data.splits.stage2_train,
        data.splits.eval,
        cfg.stage1.max_len,
        cfg.seed,
    )
    return VariantResult(
        variant, preds, score(data, preds), seconds=time.time() - t0, extra={**extra, "reference": True}
    )


# Registered as three rows of one family: the patterns share run_readout, which parses the variant name.
METHODS = (
    Method(
        "ref-count", "reference", "label share of the whole history + the backbone's label probabilities", run_readout
    ),
    Method(
        "ref-count-lastK",
        "reference",
        "the same over the K most recent records",
        run_readout,
        pattern=r"ref-count-last(\d+)",
    ),
    Method("ref-ridge", "reference", "a ridge readout of the pooled history vector + the backbone", run_readout),
)
