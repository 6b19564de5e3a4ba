"""RAG as LaMP does it: BM25 over the user's own history, top-k records written into the prompt.

LaMP (Salemi et al., `prompts/prompts.py`) fixes, per task, which record
fields form the BM25 corpus and which part of the input is the BM25 query
(both in `tapper.data.bm25`, which TAP-PER's pre-filter shares), and the
sentence each retrieved record becomes. The retrieved sentences are
joined with ", and " and put before the input: `{r1}, and {r2}. {input}`
(LaMP-5/7 add "Following the given patterns"; LaMP-1 inserts the titles
after the paper's own title). Those wordings are reproduced here; the code is
ours.

Leakage rules: only the example's own `history` is searched (for queries that
is the user's full profile, for Stage-2 examples the records strictly before
the example), and the record an example was made from (`source_record_id`)
is excluded explicitly, whatever the history holds.

Length: the free-text field of each retrieved record (article text, review,
abstract, ...) is truncated so that the retrieval block fits in what
`max_len` leaves after the input (the input may take at most 60% of it, as in
LaMP); unused budget of a short record passes to the next one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tapper.data.types import Example, Record
from tapper.data.bm25 import Bm25Index, rank


@dataclass(frozen=True)
class RecordFormat:
    text_field: str  # the free-text field that is truncated to fit
    template: str  # one retrieved record as a sentence; {text} is the truncated text_field
    suffix: str = ""  # words between the retrieval block and the input


# LaMP's sentence for one retrieved record, per task.
FORMATS: dict[str, RecordFormat] = {
    "LaMP_1": RecordFormat("title", '"{text}"'),
    "LaMP_2N": RecordFormat("text", 'the category for the article: "{text}" is "{category}" '),
    "LaMP_2M": RecordFormat("description", 'the tag for the movie: "{text}" is "{tag}" '),
    "LaMP_3": RecordFormat("text", '{score} is the score for "{text}" '),
    "LaMP_4": RecordFormat("text", '"{title}" is the title for "{text}" '),
    "LaMP_5": RecordFormat("abstract", '"{title}" is a title for "{text}" ', "Following the given patterns "),
    "LaMP_6": RecordFormat("text", '"{title}" is the title for "{text}" '),
    "LaMP_7": RecordFormat("text", '"{text}" ', "are written by a person. Following the given patterns "),
}

JOINER = ", and "
# The input may use at most this share of max_len; the rest is kept for retrieved records (LaMP: 0.6).
INPUT_SHARE = 0.6


def record_format(task) -> RecordFormat:
    try:
        return FORMATS[task.name]
    except KeyError:
        raise ValueError(f"no LaMP retrieval format for task {task.name!r}") from None


def candidates(example: Example) -> list[Record]:
    """Records RAG may retrieve for `example`: its own history, never the record it was made from."""
    return [r for r in example.history if r.id != example.source_record_id]


def retrieve(task, example: Example, k: int, index: Bm25Index | None = None) -> list[Record]:
    """Top-k records by BM25 (best first; ties -> the more recent record). `index`: the user's (tapper.data.bm25)."""
    pool = candidates(example)
    if k <= 0 or not pool:
        return []
    order = rank(task, example.input, pool, index)
    return [pool[i] for i in order[:k]]


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _truncate(tokenizer, text: str, n: int) -> str:
    if n <= 0:
        return ""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= n else tokenizer.decode(ids[:n], skip_special_tokens=True)


def format_records(task, records: list[Record], tokenizer, budget: int) -> list[str]:
    """Each record as LaMP's sentence, its free text truncated so that all fit in `budget` tokens."""
    if not records:
        return []
    fmt = record_format(task)
    per_record = (budget - _n_tokens(tokenizer, JOINER) * (len(records) - 1)) // len(records)
    carry = 0
    out = []
    for r in records:
        fields = dict(r.fields)
        fixed = _n_tokens(tokenizer, fmt.template.format(**{**fields, "text": ""}))
        allowed = per_record + carry - fixed
        text = _truncate(tokenizer, fields.get(fmt.text_field, ""), allowed)
        used = _n_tokens(tokenizer, text)
        carry = max(allowed - used, 0)
        out.append(fmt.template.format(**{**fields, "text": text}))
    return out


def insert_records(task, text: str, sentences: list[str]) -> str:
    """Put retrieved sentences into the input the way LaMP does for the task."""
    if not sentences:
        return text
    block = JOINER.join(sentences)
    if task.name == "LaMP_1":
        # LaMP-1: `... the title "X", and "r1", and "r2", which reference ...`
        m = re.search(r'title "[^"]*"', text)
        if m:
            return text[: m.end()] + JOINER + block + text[m.end() :]
    fmt = record_format(task)
    return f"{block}. {fmt.suffix}{text}"


@dataclass
class Augmented:
    text: str  # the augmented input (what `TaskSpec.prompt` then wraps)
    records: list[Record]  # retrieved records, best first
    profile: str | None = None


def retrieval_budget(task, tokenizer, text: str, max_len: int, reserve: int) -> int:
    """Tokens left for the retrieval block after the input (capped at INPUT_SHARE of max_len) and `reserve`."""
    input_tokens = _n_tokens(tokenizer, task.prompt(text))
    return max(max_len - reserve - min(input_tokens, int(INPUT_SHARE * max_len)), 0)


def augment(
    task,
    example: Example,
    k: int,
    tokenizer,
    max_len: int,
    reserve: int = 8,
    profile: str | None = None,
    index: Bm25Index | None = None,
) -> Augmented:
    """The example's input with its top-k records (and a PAG profile, if given) written in.

    `reserve` keeps room for the target tokens (and soft tokens, if any); `index`: the user's BM25 index.
    """
    records = retrieve(task, example, k, index)
    text = example.input
    if profile:
        reserve += _n_tokens(tokenizer, profile_sentence(profile))
    sentences = format_records(task, records, tokenizer, retrieval_budget(task, tokenizer, text, max_len, reserve))
    text = insert_records(task, text, sentences)
    if profile:
        text = profile_sentence(profile) + text
    return Augmented(text=text, records=records, profile=profile)


def profile_sentence(profile: str) -> str:
    """How a PAG profile is put before the prompt (Richardson et al.: profile, then the task input)."""
    return f"user profile: {profile.strip()}\n"
