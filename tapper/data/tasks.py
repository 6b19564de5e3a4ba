"""What each LaMP task is: its labels, profile fields, input template and metrics.

This is the one place that decides how a record or a query becomes text for
the model (`make_input`, `record_text`, `prompt`, `format_target`), so every
method — TAP-PER, the baselines, Stage 1 — sees exactly the same strings.
Templates are LaMP's own (LaMP/data/datasets.py), copied verbatim.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field, replace
from typing import Iterable, Literal

from tapper.data.types import Record

Kind = Literal["classification", "regression", "generation"]

LAMP_2N_LABELS = (
    "travel",
    "education",
    "parents",
    "style & beauty",
    "entertainment",
    "food & drink",
    "science & technology",
    "business",
    "sports",
    "healthy living",
    "women",
    "politics",
    "crime",
    "culture & arts",
    "religion",
)
LAMP_2M_LABELS = (
    "sci-fi",
    "based on a book",
    "comedy",
    "action",
    "twist ending",
    "dystopia",
    "dark comedy",
    "classic",
    "psychology",
    "fantasy",
    "romance",
    "thought-provoking",
    "social commentary",
    "violence",
    "true story",
)
LAMP_3_LABELS = ("1", "2", "3", "4", "5")
LAMP_1_LABELS = ("[1]", "[2]")

_CLASSIFICATION_METRICS = ("accuracy", "f1")
_REGRESSION_METRICS = ("mae", "rmse")
_GENERATION_METRICS = ("rouge-1", "rouge-L")

# The MovieLens builder (tapper.builders.movielens) writes LaMP-3-style
# queries about movies, not reviews. Its records use LaMP-3's fields (text,
# score), so the task stays LaMP_3; only the wording of the input differs,
# and `TaskSpec.adapted_to` picks this template when the queries use it, so
# that history records turned into examples read like the queries.
MOVIE_RATING_TEMPLATE = (
    "What is the score of the following movie on a scale of 1 to 5? just answer "
    "with 1, 2, 3, 4, or 5 without further explanation. movie: {text}"
)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: Kind
    labels: tuple[str, ...] | None
    profile_fields: tuple[str, ...]
    # The profile field that holds the answer. None for LaMP_1, whose profile
    # items (the author's own papers) hold no answer to a citation question.
    target_field: str | None
    metrics: tuple[str, ...]
    # `str.format` template over profile-field names (LaMP_1: title, ref1, ref2).
    input_template: str
    # Order in which fields are written into `record_text`: answer first, so
    # the answer is part of the record's vector.
    embed_order: tuple[str, ...]
    # Other wordings of the same task that builders may write (see
    # MOVIE_RATING_TEMPLATE); `adapted_to` switches to the one the data uses.
    alternative_templates: tuple[str, ...] = field(default=())

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]

    @property
    def higher_is_better(self) -> bool:
        """For the primary metric: accuracy and ROUGE-1 go up, MAE goes down."""
        return self.kind != "regression"

    def make_input(self, **fields: str) -> str:
        # str.format only parses the template, so braces in user text are safe;
        # extra keyword arguments (e.g. LaMP_2N's title) are ignored.
        try:
            return self.input_template.format(**fields)
        except KeyError as missing:
            raise ValueError(f"{self.name}: make_input needs field {missing.args[0]!r}") from None

    def record_example(self, record: Record) -> tuple[str, str] | None:
        """The (input, target) the record would have been as a query.

        LaMP_1 returns None: a profile item is one of the author's own papers,
        and no citation question with two candidate references can be made
        from it. LaMP_7's pair is (paraphrase-instruction(tweet), tweet), i.e.
        an identity pair: LaMP gives no paraphrase source for history tweets
        (the reason the paper leaves LaMP_7 out), so it only teaches style.
        """
        if self.target_field is None:
            return None
        target = record.fields[self.target_field]
        return self.make_input(**record.fields), target

    def record_text(self, record: Record) -> str:
        """Text embedded for the record's vector, e.g. `category: politics title: ... text: ...`."""
        return " ".join(f"{name}: {record.fields[name]}" for name in self.embed_order if name in record.fields)

    def prompt(self, input: str) -> str:  # noqa: A002 - LaMP's name for the query text
        return f"{input}\nAnswer:"

    def format_target(self, output: str) -> str:
        # The leading space makes the target start a new word after "Answer:",
        # matching how the tokenizer would split the full string.
        return " " + output

    def parse_prediction(self, text: str) -> str:
        # LaMP's evaluator only strips; anything else would flatter the model.
        return text.strip()

    def query_content(self, input: str) -> str:  # noqa: A002
        """What a query says, without the task's instruction: the text its template's fields hold.

        The query vector z_q is the mean of the query's token embeddings, and the template is most
        of a templated input (LaMP-2N: the instruction and all 15 label names around a short
        article), so the mean of the whole input is nearly the same vector for every query and the
        DIN attention cannot condition on it. An input that does not follow the template has no
        template text to strip and is its own content.
        """
        m = _template_regex(self.input_template).fullmatch(input)
        if m is None:
            return input
        return " ".join(v.strip() for v in m.groups() if v and v.strip())

    def template_prefix(self, template: str | None = None) -> str:
        """The fixed text before the first placeholder, used to recognise a template."""
        return re.split(r"\{", template or self.input_template, maxsplit=1)[0]

    def adapted_to(self, inputs: Iterable[str]) -> "TaskSpec":
        """This spec with the input template the given query inputs actually use.

        Returns self unless every input starts with an alternative template's
        fixed prefix (e.g. MovieLens-built LaMP_3 data).
        """
        inputs = list(inputs)
        if not inputs:
            return self
        for template in self.alternative_templates:
            prefix = self.template_prefix(template)
            if all(text.startswith(prefix) for text in inputs):
                others = tuple(t for t in (self.input_template, *self.alternative_templates) if t != template)
                return replace(self, input_template=template, alternative_templates=others)
        return self


@functools.lru_cache(maxsize=None)
def _template_regex(template: str) -> re.Pattern:
    """The template as a regex: its literal text fixed, each `{field}` a lazy group."""
    parts = re.split(r"\{[^{}]*\}", template)
    return re.compile("(.*?)".join(re.escape(p) for p in parts), re.DOTALL)


def _classification_categories(labels: tuple[str, ...]) -> str:
    return "[" + ", ".join(labels) + "]"


_SPECS: dict[str, TaskSpec] = {
    "LaMP_1": TaskSpec(
        name="LaMP_1",
        kind="classification",
        labels=LAMP_1_LABELS,
        profile_fields=("title", "abstract"),
        target_field=None,
        metrics=_CLASSIFICATION_METRICS,
        input_template=(
            'For an author who has written the paper with the title "{title}", which reference is '
            'related? Just answer with "[1]" or "[2]" without explanation. [1]: "{ref1}" [2]: "{ref2}"'
        ),
        embed_order=("title", "abstract"),
    ),
    "LaMP_2N": TaskSpec(
        name="LaMP_2N",
        kind="classification",
        labels=LAMP_2N_LABELS,
        profile_fields=("text", "title", "category"),
        target_field="category",
        metrics=_CLASSIFICATION_METRICS,
        input_template=(
            "Which category does this article relate to among the following categories? Just answer "
            "with the category name without further explanation. categories: "
            + _classification_categories(LAMP_2N_LABELS)
            + " article: {text}"
        ),
        embed_order=("category", "title", "text"),
    ),
    "LaMP_2M": TaskSpec(
        name="LaMP_2M",
        kind="classification",
        labels=LAMP_2M_LABELS,
        profile_fields=("description", "tag"),
        target_field="tag",
        metrics=_CLASSIFICATION_METRICS,
        input_template=(
            "Which tag does this movie relate to among the following tags? Just answer with the tag "
            "name without further explanation. tags: "
            + _classification_categories(LAMP_2M_LABELS)
            + " description: {description}"
        ),
        embed_order=("tag", "description"),
    ),
    "LaMP_3": TaskSpec(
        name="LaMP_3",
        kind="regression",
        labels=LAMP_3_LABELS,
        profile_fields=("text", "score"),
        target_field="score",
        metrics=_REGRESSION_METRICS,
        input_template=(
            "What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, "
            "4, or 5 without further explanation. review: {text}"
        ),
        embed_order=("score", "text"),
        alternative_templates=(MOVIE_RATING_TEMPLATE,),
    ),
    "LaMP_4": TaskSpec(
        name="LaMP_4",
        kind="generation",
        labels=None,
        profile_fields=("text", "title"),
        target_field="title",
        metrics=_GENERATION_METRICS,
        input_template="Generate a headline for the following article: {text}",
        embed_order=("title", "text"),
    ),
    "LaMP_5": TaskSpec(
        name="LaMP_5",
        kind="generation",
        labels=None,
        profile_fields=("abstract", "title"),
        target_field="title",
        metrics=_GENERATION_METRICS,
        input_template="Generate a title for the following abstract of a paper: {abstract}",
        embed_order=("title", "abstract"),
    ),
    "LaMP_6": TaskSpec(
        name="LaMP_6",
        kind="generation",
        labels=None,
        profile_fields=("text", "title"),
        target_field="title",
        metrics=_GENERATION_METRICS,
        input_template="Generate a subject for the following email: {text}",
        embed_order=("title", "text"),
    ),
    "LaMP_7": TaskSpec(
        name="LaMP_7",
        kind="generation",
        labels=None,
        profile_fields=("text",),
        target_field="text",
        metrics=_GENERATION_METRICS,
        input_template="Paraphrase the following tweet without any explanation before or after it: {text}",
        embed_order=("text",),
    ),
}

TASK_NAMES: tuple[str, ...] = tuple(_SPECS)


def canonical_task_name(name: str) -> str:
    """'LaMP-2N', 'lamp_2n', 'lamp2n' -> 'LaMP_2N'; ValueError listing the valid names otherwise."""
    key = re.sub(r"[\s_\-]", "", str(name)).lower()
    for canonical in _SPECS:
        if canonical.replace("_", "").lower() == key:
            return canonical
    raise ValueError(f"unknown LaMP task {name!r}; valid tasks: {', '.join(TASK_NAMES)}")


def get_task(name: str) -> TaskSpec:
    return _SPECS[canonical_task_name(name)]
