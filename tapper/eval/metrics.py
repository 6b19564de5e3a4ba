"""LaMP's official metrics (LaMP/eval/evaluation.py), reproduced exactly.

- Predictions and golds are only stripped.
- Classification: labels are mapped to their index in the task's label list;
  anything not in the list becomes -1, which never equals a gold, so it
  counts as wrong. Macro-F1 runs over the *whole* label list, so a label
  that never occurs in golds or predictions contributes an F1 of 0, as in
  LaMP (its `evaluate` F1 is sklearn's with the default zero division 0).
- LaMP-3: float(prediction); one that does not parse becomes the rating
  farthest from the gold (`1 if |1-gold| > |5-gold| else 5`). We also treat
  NaN and infinities as unparsable, where LaMP would propagate them.
  RMSE is sqrt(MSE).
- Generation: rouge-score's ROUGE-1 and ROUGE-L F-measure without stemming,
  averaged over examples.
"""

from __future__ import annotations

import math

from tapper.data.tasks import TaskSpec, get_task


def compute_metrics(task: TaskSpec | str, preds: dict[str, str], golds: dict[str, str]) -> dict[str, float]:
    """Metrics keyed by the task's metric names, over every id in `golds`."""
    spec, ids, pred_texts, gold_texts = _aligned(task, preds, golds)
    if spec.kind == "classification":
        return _classification(spec, pred_texts, gold_texts)
    if spec.kind == "regression":
        return _rating(ids, pred_texts, gold_texts)
    return _generation(pred_texts, gold_texts)


def per_query_scores(task: TaskSpec | str, preds: dict[str, str], golds: dict[str, str]) -> dict[str, float]:
    """Each query's share of the task's primary metric, whose mean over the queries is that metric: 1 or 0 for
    accuracy, the absolute error for MAE, the ROUGE-1 F-measure for ROUGE-1. What paired comparisons of two
    models on the same queries resample (tapper.eval.paired)."""
    spec, ids, pred_texts, gold_texts = _aligned(task, preds, golds)
    if spec.kind == "classification":
        index = {label: i for i, label in enumerate(spec.labels or ())}
        values = [float(index.get(p, -1) == index.get(g, -1)) for p, g in zip(pred_texts, gold_texts)]
    elif spec.kind == "regression":
        values = [abs(p - g) for p, g in zip(*_rating_values(ids, pred_texts, gold_texts))]
    else:
        values = [r1 for r1, _ in _rouge(pred_texts, gold_texts)]
    return dict(zip(ids, values))


def _aligned(task: TaskSpec | str, preds: dict[str, str], golds: dict[str, str]):
    """(spec, ids, parsed predictions, stripped golds) over every id in `golds`; a missing prediction is an error."""
    spec = task if isinstance(task, TaskSpec) else get_task(task)
    if not golds:
        raise ValueError("no golds to evaluate against")
    ids = list(golds)
    missing = [i for i in ids if i not in preds]
    if missing:
        shown = ", ".join(repr(i) for i in missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"no prediction for gold id {shown}{more}")
    return spec, ids, [spec.parse_prediction(preds[i]) for i in ids], [golds[i].strip() for i in ids]


def _classification(spec: TaskSpec, preds: list[str], golds: list[str]) -> dict[str, float]:
    from sklearn.metrics import f1_score

    labels = list(spec.labels or ())
    index = {label: i for i, label in enumerate(labels)}
    y_pred = [index.get(p, -1) for p in preds]
    y_true = [index.get(g, -1) for g in golds]
    accuracy = sum(p == t for p, t in zip(y_pred, y_true)) / len(y_true)
    f1 = f1_score(y_true, y_pred, labels=list(range(len(labels))), average="macro", zero_division=0)
    return {"accuracy": float(accuracy), "f1": float(f1)}


def farthest_rating(gold: float) -> float:
    """LaMP's stand-in for an unparsable rating: the extreme farthest from the gold (ties -> 5)."""
    return 1.0 if abs(1 - gold) > abs(5 - gold) else 5.0


def parse_rating(pred: str, gold: float) -> float:
    try:
        value = float(pred)
    except ValueError:
        return farthest_rating(gold)
    return value if math.isfinite(value) else farthest_rating(gold)


def _rating_values(ids: list[str], preds: list[str], golds: list[str]) -> tuple[list[float], list[float]]:
    gold_values = []
    for gold_id, gold in zip(ids, golds):
        try:
            gold_values.append(float(gold))
        except ValueError:
            raise ValueError(f"gold {gold!r} of id {gold_id!r} is not a rating") from None
    return [parse_rating(p, g) for p, g in zip(preds, gold_values)], gold_values


def _rating(ids: list[str], preds: list[str], golds: list[str]) -> dict[str, float]:
    errors = [p - g for p, g in zip(*_rating_values(ids, preds, golds))]
    mae = sum(abs(e) for e in errors) / len(errors)
    mse = sum(e * e for e in errors) / len(errors)
    return {"mae": mae, "rmse": math.sqrt(mse)}


def _rouge(preds: list[str], golds: list[str]) -> list[tuple[float, float]]:
    """(ROUGE-1, ROUGE-L) F-measures of each prediction."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    out = []
    for pred, gold in zip(preds, golds):
        scores = scorer.score(gold, pred)  # (target, prediction)
        out.append((scores["rouge1"].fmeasure, scores["rougeL"].fmeasure))
    return out


def _generation(preds: list[str], golds: list[str]) -> dict[str, float]:
    scores = _rouge(preds, golds)
    n = len(golds)
    return {"rouge-1": sum(r1 for r1, _ in scores) / n, "rouge-L": sum(rl for _, rl in scores) / n}
