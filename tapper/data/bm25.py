"""BM25 over a user's own history, as LaMP searches it: one definition for RAG and TAP-PER's pre-filter.

LaMP (Salemi et al., `prompts/prompts.py`) fixes, per task, which record
fields form the corpus and which part of the input is the query: the text
after the instruction (LaMP-1: the two candidate references). Searching with
the whole templated input would add the instruction and, for LaMP-2, all
fifteen label names to every query, and BM25's IDF would then favour the
records whose label is rare in the user's history.
"""

from __future__ import annotations

import math
import re

import numpy as np

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
    return text[len(head) :] if head and text.startswith(head) else text


def corpus_text(task, record: Record) -> str:
    try:
        fields = CORPUS_FIELDS[task.name]
    except KeyError:
        raise ValueError(f"no BM25 corpus fields for task {task.name!r}") from None
    return " ".join(record.fields.get(f, "") for f in fields).strip()


def rank(task, text: str, records: list[Record], index: Bm25Index | None = None) -> list[int]:
    """Indices of `records`, best BM25 match for the input `text` first; ties go to the more recent record.

    `index`: the user's Bm25Index, so that a user's records are tokenized once for all of their examples (pass
    one per user; without it a throwaway index is built)."""
    if not records:
        return []
    index = index if index is not None else Bm25Index()
    docs = [index.doc(corpus_text(task, r)) for r in records]
    scores = index.scores(bm25_tokens(search_query(task, text)), docs)
    return sorted(range(len(records)), key=lambda i: (-float(scores[i]), -i))


class Bm25Index:
    """A user's records tokenized once, scored as rank_bm25's BM25Okapi over any list of them.

    Every example of a user searches a different corpus (a Stage-2 example: the records before it; a query:
    the whole profile), and building a BM25Okapi per example re-tokenized and re-counted the user's records
    every time, O(n²) per user. Here each distinct text is tokenized and counted once; `scores` computes the
    corpus statistics of the given documents (N, document frequencies, average length, the ε floor of
    negative idfs) with array operations and gives the same scores as `BM25Okapi(corpus).get_scores(query)`,
    bit for bit: the same arithmetic in the same order (idfs summed in the order BM25Okapi meets the words,
    logs from math.log). tests/test_bm25.py checks that against rank_bm25 itself."""

    k1, b, epsilon = 1.5, 0.75, 0.25  # BM25Okapi's defaults, which LaMP uses

    def __init__(self):
        self._doc_of: dict[str, int] = {}
        self._vocab: dict[str, int] = {}
        self._terms: list[np.ndarray] = []  # per document: term ids in order of first occurrence
        self._counts: list[np.ndarray] = []  # their counts in the document
        self._lengths: list[int] = []
        self._log_half = np.zeros(0)  # math.log(k + 0.5) for k = 0, 1, ...

    def __len__(self) -> int:
        return len(self._terms)

    def doc(self, text: str) -> int:
        """The document id of `text`, tokenized the first time it is seen."""
        found = self._doc_of.get(text)
        if found is not None:
            return found
        counts: dict[int, int] = {}
        tokens = bm25_tokens(text) or ["<empty>"]  # as rank() always did: an empty record is one unknown word
        for word in tokens:
            term = self._vocab.setdefault(word, len(self._vocab))
            counts[term] = counts.get(term, 0) + 1
        self._terms.append(np.fromiter(counts.keys(), dtype=np.int64, count=len(counts)))
        self._counts.append(np.fromiter(counts.values(), dtype=np.int64, count=len(counts)))
        self._lengths.append(len(tokens))
        self._doc_of[text] = len(self._terms) - 1
        return len(self._terms) - 1

    def _log(self, k: np.ndarray) -> np.ndarray:
        top = int(k.max(initial=0))
        if top >= len(self._log_half):
            self._log_half = np.array([math.log(i + 0.5) for i in range(2 * top + 1)])
        return self._log_half[k]

    def scores(self, query: list[str], docs: list[int]) -> np.ndarray:
        """BM25Okapi scores of `query` (tokens) over the corpus made of documents `docs` (repeats allowed), in order."""
        n = len(docs)
        if n == 0:
            return np.zeros(0)
        terms = np.concatenate([self._terms[d] for d in docs])
        counts = np.concatenate([self._counts[d] for d in docs])
        position = np.repeat(np.arange(n), [len(self._terms[d]) for d in docs])
        # Document frequency of each term of this corpus, and the order BM25Okapi first meets it (its dict order).
        words, first, df = np.unique(terms, return_index=True, return_counts=True)
        idf = self._log(n - df) - self._log(df)
        average = np.cumsum(idf[np.argsort(first, kind="stable")])[-1] / len(words)  # sequential, like its loop
        idf = np.where(idf < 0, self.epsilon * average, idf)
        doc_len = np.array([self._lengths[d] for d in docs])
        avgdl = sum(self._lengths[d] for d in docs) / n
        denominator = self.k1 * (1 - self.b + self.b * doc_len / avgdl)
        score = np.zeros(n)
        for word in query:
            term = self._vocab.get(word)
            if term is None:
                continue  # BM25Okapi adds 0 for a word outside the corpus
            at = np.searchsorted(words, term)
            if at == len(words) or words[at] != term:
                continue
            q_freq = np.zeros(n, dtype=np.int64)
            hit = terms == term
            q_freq[position[hit]] = counts[hit]
            score += idf[at] * (q_freq * (self.k1 + 1) / (q_freq + denominator))
        return score
