"""LaMP evaluator semantics, checked against hand-computed cases."""
from __future__ import annotations

import math

import pytest

from tapper.eval.metrics import compute_metrics, farthest_rating


def test_classification_out_of_label_is_wrong_and_f1_is_over_all_labels():
    golds = {"a": "politics", "b": "politics", "c": "sports", "d": "crime"}
    preds = {"a": " politics\n", "b": "Politics", "c": "sports", "d": "politics"}
    m = compute_metrics("LaMP_2N", preds, golds)
    assert m["accuracy"] == pytest.approx(0.5)
    # politics: P=1/2, R=1/2 -> F1 0.5; sports 1.0; crime 0; the 12 unused labels 0.
    # Macro over all 15 labels, not just the 3 seen: (0.5 + 1) / 15.
    assert m["f1"] == pytest.approx(1.5 / 15)


def test_classification_perfect_on_two_labels_still_averages_over_the_list():
    m = compute_metrics("LaMP_1", {"x": "[1]", "y": "[2]"}, {"x": "[1]", "y": "[2]"})
    assert m == {"accuracy": 1.0, "f1": 1.0}
    m = compute_metrics("LaMP_2M", {"x": "comedy"}, {"x": "comedy"})
    assert m["accuracy"] == 1.0 and m["f1"] == pytest.approx(1 / 15)


def test_rating_unparsable_becomes_farthest_extreme():
    assert farthest_rating(1) == 5 and farthest_rating(5) == 1
    assert farthest_rating(3) == 5  # tie: LaMP's `1 if |1-g| > |5-g| else 5`
    assert farthest_rating(2) == 5 and farthest_rating(4) == 1
    golds = {"a": "1", "b": "5", "c": "3", "d": "4", "e": "1"}
    preds = {"a": "2", "b": "five", "c": "", "d": " 4 ", "e": "nan"}
    # errors: 1, |1-5|=4, |5-3|=2, 0, |5-1|=4
    m = compute_metrics("LaMP_3", preds, golds)
    assert m["mae"] == pytest.approx(11 / 5)
    assert m["rmse"] == pytest.approx(math.sqrt((1 + 16 + 4 + 0 + 16) / 5))


def test_rating_accepts_any_float_like_lamp():
    m = compute_metrics("LaMP_3", {"a": "4.5"}, {"a": "4"})
    assert m == {"mae": 0.5, "rmse": 0.5}


def test_rouge_f_measure_averaged():
    golds = {"x": "the cat sat", "y": "a b c d"}
    preds = {"x": "The cat", "y": "d c b a"}
    m = compute_metrics("LaMP_4", preds, golds)
    # x: unigram P=1, R=2/3 -> F=0.8, LCS 2 -> 0.8; y: unigrams all match -> 1, LCS 1 -> 0.25
    assert m["rouge-1"] == pytest.approx((0.8 + 1.0) / 2)
    assert m["rouge-L"] == pytest.approx((0.8 + 0.25) / 2)


def test_rouge_does_not_stem():
    m = compute_metrics("LaMP_5", {"x": "running dogs"}, {"x": "run dog"})
    assert m["rouge-1"] == 0.0


def test_missing_prediction_names_the_id():
    with pytest.raises(ValueError, match="'b'"):
        compute_metrics("LaMP_2N", {"a": "travel"}, {"a": "travel", "b": "crime"})


def test_metric_names_follow_the_task_spec():
    from tapper.data.tasks import get_task
    for name, golds in [("LaMP_2N", {"a": "travel"}), ("LaMP_3", {"a": "3"}), ("LaMP_7", {"a": "hi"})]:
        assert tuple(compute_metrics(name, golds, golds)) == get_task(name).metrics


def test_unparsable_gold_rating_names_the_id():
    with pytest.raises(ValueError, match="'g7'"):
        compute_metrics("LaMP_3", {"g7": "3"}, {"g7": "three"})
