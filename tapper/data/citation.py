"""LaMP-1's Stage-2 training examples: self-citation pairs made from an author's own papers.

A LaMP-1 profile item is one of the author's papers (title, abstract) and says
nothing about which reference they cite, so `TaskSpec.record_example` cannot
turn it into a question. The paper does not say how its Stage 2 trained on
LaMP-1 (its Table 6 counts 318 history items per user), and OPPU's released
code trains LaMP-1 adapters on `paper title: {title} reference: {citation}`
pairs, from a `citation` field that LaMP's profiles do not have. We build
questions in LaMP-1's own wording instead:

    For an author who has written the paper with the title "<paper i>", which
    reference is related? ... [1]: "<a>" [2]: "<b>"

One candidate is another paper by the same author (the positive: an author's
own work is related to what they write; we take their next paper, or the
previous one for their latest), the other the title of a paper by a different
user (the negative). Which of [1]/[2] is the positive is drawn per example from
a seed made of the user and record ids, so it is the same on every run. The
example's history is the records before paper i, without the positive, so the
answer is never one of the records the prefix reads (at evaluation the cited
paper is not in the profile either).
"""

from __future__ import annotations

import hashlib
import random
from typing import Sequence

from tapper.data.types import Example, Record


def _rng(*parts: str) -> random.Random:
    return random.Random(int(hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16], 16))


def citation_examples(task, user_id: str, history: list[Record], distractors: Sequence[str] | None) -> list[Example]:
    """One LaMP-1 question per paper of `history` (chronological); `distractors` are other users' titles."""
    if not distractors:
        raise ValueError(
            f"{task.name}: user {user_id!r}: self-citation examples need titles of other users' papers "
            "as negatives, and none were given"
        )
    own = {r.fields.get("title", "") for r in history}
    pool = [t for t in dict.fromkeys(distractors) if t and t not in own]
    if not pool:
        raise ValueError(f"{task.name}: user {user_id!r}: every distractor title is one of the user's own papers")
    examples = []
    for i, record in enumerate(history):
        if len(history) < 2:
            break
        j = i + 1 if i + 1 < len(history) else i - 1
        rng = _rng(user_id, record.id)
        positive = history[j].fields["title"]
        negative = pool[rng.randrange(len(pool))]
        first = rng.random() < 0.5
        ref1, ref2 = (positive, negative) if first else (negative, positive)
        examples.append(
            Example(
                id=f"{user_id}/{record.id}",
                user_id=user_id,
                input=task.make_input(title=record.fields["title"], ref1=ref1, ref2=ref2),
                target="[1]" if first else "[2]",
                history=[r for r in history[:i] if r is not history[j]],
                query_date=record.date,
                source_record_id=record.id,
            )
        )
    return examples
