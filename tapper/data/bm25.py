"""BM25 over a user's own history, as LaMP searches it: one definition for RAG and TAP-PER's pre-filter.

LaMP (Salemi et al., `prompts/prompts.py`) fixes, per task, which record
fields form the corpus and which part of the input is the query: the text
after the instruction (LaMP-1: the two candidate references). Searching with
the whole templated input would add the instruction and, for LaMP-2, all
fifteen label names to every query, and BM25's IDF would then favour the
records whose label is rare in the user's history.
"""
from __future__ import annotations

import re

from rank_bm25 import BM25Okapi

from tapper.data.types import Record

_WORD = re.compile(r"\w+")

# The record fields BM25 searches, per task (LaMP's choice).
CORPUS_FIELDS: dict[str, tuple[str, ...]] = {
    "LaMP_1": ("title", "abstract"),
    "LaMP_2N": ("title", "text"),
    "LaMP_2M": ("description",),
    "LaMP_3": ("text",),
    "LaMP_4": ("title", "text"),
    "LaMP_5": ("title", "abstract"),
    "LaMP_6": ("text",),
    "LaMP_7": ("text",),
}


def bm25_tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def search_query(task, text: str) -> str:
    """The part of the input LaMP searches with: the text after the template's fixed head.

    LaMP-1 searches with the two candidate references (the last two quoted strings).
    """
    if task.name == "LaMP_1":
        quoted = re.findall(r'"(.*?)"', text)
        if len(quoted) >= 3:
            return f"{quoted[-2]} {quoted[-1]}"
        return text
    head = task.template_prefix()
    return text[len(head):] if head and text.startswith(head) else text


def corpus_text(task, record: Record) -> str:
    try:
        fields = CORPUS_FIELDS[task.name]
    except KeyError:
        raise ValueError(f"no BM25 corpus fields for task {task.name!r}") from None
    return " ".join(record.fields.get(f, "") for f in fields).strip()


def rank(task, text: str, records: list[Record]) -> list[int]:
    """Indices of `records`, best BM25 match for the input `text` first; ties go to the more recent record."""
    if not records:
        return []
    corpus = [bm25_tokens(corpus_text(task, r)) or ["<empty>"] for r in records]
    query = bm25_tokens(search_query(task, text))
    scores = BM25Okapi(corpus).get_scores(query) if query else [0.0] * len(records)
    return sorted(range(len(records)), key=lambda i: (-float(scores[i]), -i))
