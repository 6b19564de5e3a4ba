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


def test_per_query_scores_average_to_the_primary_metric_for_every_kind():
    from tapper.eval.metrics import per_query_scores

    cases = [
        (
            "LaMP_2N",
            {"a": " politics\n", "b": "Politics", "c": "sports", "d": "politics"},
            {"a": "politics", "b": "politics", "c": "sports", "d": "crime"},
            "accuracy",
            {"a": 1, "b": 0, "c": 1, "d": 0},
        ),
        (
            "LaMP_3",
            {"a": "2", "b": "five", "c": "", "d": " 4 ", "e": "nan"},
            {"a": "1", "b": "5", "c": "3", "d": "4", "e": "1"},
            "mae",
            {"a": 1, "b": 4, "c": 2, "d": 0, "e": 4},
        ),
        (
            "LaMP_4",
            {"x": "The cat", "y": "d c b a"},
            {"x": "the cat sat", "y": "a b c d"},
            "rouge-1",
            {"x": 0.8, "y": 1.0},
        ),
    ]
    for task, preds, golds, metric, expected in cases:
        per_query = per_query_scores(task, preds, golds)
        assert per_query == pytest.approx(expected)
        assert sum(per_query.values()) / len(per_query) == pytest.approx(compute_metrics(task, preds, golds)[metric])
    with pytest.raises(ValueError, match="'b'"):
        per_query_scores("LaMP_2N", {"a": "crime"}, {"a": "crime", "b": "crime"})


def test_paired_difference_interval_covers_the_mean_and_is_seeded():
    from tapper.eval.paired import describe, paired_difference

    a = {str(i): float(i % 3 != 0) for i in range(300)}  # 2/3 right
    b = {str(i): float(i % 2 == 0) for i in range(300)}  # 1/2 right
    st = paired_difference(a, b, seed=0)
    assert st["mean"] == pytest.approx(2 / 3 - 1 / 2) and st["queries"] == 300
    lo, hi = st["ci95"]
    assert lo < st["mean"] < hi and hi - lo < 0.2 and lo > 0
    assert st == paired_difference(a, b, seed=0) and st["ci95"] != paired_difference(a, b, seed=1)["ci95"]
    assert (st["a_higher"], st["b_higher"]) == (100, 50)
    same = paired_difference(a, a)
    assert same["mean"] == 0 and same["ci95"] == [0.0, 0.0]
    assert describe(st).endswith("over 300 queries") and describe(st).startswith("+0.167 [")
    with pytest.raises(ValueError, match="no query"):
        paired_difference({"x": 1.0}, {"y": 0.0})
