"""Task specs: names, labels, LaMP templates, and the text every method sees."""

from __future__ import annotations

import pytest

from tapper.data.tasks import MOVIE_RATING_TEMPLATE, TASK_NAMES, get_task
from tapper.data.types import Record


@pytest.mark.parametrize("alias", ["LaMP-2N", "lamp_2n", "LAMP2N", "LaMP_2N"])
def test_aliases(alias):
    assert get_task(alias).name == "LaMP_2N"


def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError) as info:
        get_task("LaMP_8")
    assert all(name in str(info.value) for name in TASK_NAMES)


def test_kinds_metrics_and_direction():
    assert get_task("LaMP_2N").metrics == ("accuracy", "f1") and get_task("LaMP_2N").higher_is_better
    assert get_task("LaMP_3").metrics == ("mae", "rmse") and not get_task("LaMP_3").higher_is_better
    assert get_task("LaMP_5").primary_metric == "rouge-1"
    assert len(get_task("LaMP_2N").labels) == len(get_task("LaMP_2M").labels) == 15
    assert get_task("LaMP_4").labels is None


def test_lamp_templates_verbatim():
    assert get_task("LaMP_2N").make_input(text="X") == (
        "Which category does this article relate to among the following categories? Just answer with the "
        "category name without further explanation. categories: [travel, education, parents, style & beauty, "
        "entertainment, food & drink, science & technology, business, sports, healthy living, women, politics, "
        "crime, culture & arts, religion] article: X"
    )
    assert get_task("LaMP_3").make_input(text="ok") == (
        "What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 "
        "without further explanation. review: ok"
    )
    assert get_task("LaMP_1").make_input(title="T", ref1="A", ref2="B") == (
        'For an author who has written the paper with the title "T", which reference is related? Just answer '
        'with "[1]" or "[2]" without explanation. [1]: "A" [2]: "B"'
    )
    assert get_task("LaMP_5").make_input(abstract="Ab") == "Generate a title for the following abstract of a paper: Ab"


def test_record_example_and_text():
    spec = get_task("LaMP_2N")
    record = Record(id="1", fields={"text": "Body {braces}", "title": "Head", "category": "politics"})
    model_input, target = spec.record_example(record)
    assert target == "politics" and model_input == spec.make_input(text="Body {braces}")
    assert spec.record_text(record) == "category: politics title: Head text: Body {braces}"
    assert get_task("LaMP_1").record_example(Record(id="p", fields={"title": "t", "abstract": "a"})) is None
    assert spec.prompt("Q") == "Q\nAnswer:" and spec.format_target("travel") == " travel"
    assert spec.parse_prediction("  travel \n") == "travel"


def test_lamp3_adapts_to_movie_wording():
    spec = get_task("LaMP_3")
    movie_input = MOVIE_RATING_TEMPLATE.format(text="Heat (1995) genres: Action")
    adapted = spec.adapted_to([movie_input])
    assert adapted.make_input(text="Heat (1995) genres: Action") == movie_input
    assert spec.adapted_to([spec.make_input(text="a review")]) is spec
