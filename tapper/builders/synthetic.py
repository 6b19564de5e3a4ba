"""A seeded synthetic LaMP_2N with a real, learnable and drifting personalization signal.

Each of the 15 LaMP-2N categories owns six distinctive keywords. An article
mentions the keywords of 2-3 candidate categories in short templated
sentences. Each user ranks the 15 categories (a random permutation, so users
differ), and the gold of an article is the user's most-preferred category
among its candidates. The text says which categories are possible; only the
user's history says which one this user picks.

Drift: a fraction of users change their ranking on a drift date inside their
history (by default between 30% and 50% of it; `drift_at` moves it). By default
(`drift_kind="swap"`) three categories from the bottom nine become the new top
three and the old top three drop to the bottom; `drift_kind="reverse"` turns
the whole ranking around, so that every earlier choice between two categories
points the wrong way afterwards. Queries are the latest items, so always after the drift,
and recent history is then more informative than old history. The later the
drift, the more of the history argues for the old ranking.

Dates: one item a day by default, so the day gap and the order gap of two
items are the same number. `gap_days=(lo, hi)` draws each gap uniformly from
lo..hi days instead (from its own random stream, so the articles and labels
stay those of the same seed), which gives λ_t and λ_o different signals.

What a model can reach: a non-personalized model can at best guess the
candidate that is most popular over all users (about 0.4-0.5 accuracy here),
while one that knows the user's current ranking scores 1.0.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from tapper.atomic import atomic_write_text
from tapper.builders.common import BuildSummary, command_line, counts_section, write_build
from tapper.data.tasks import LAMP_2M_LABELS, LAMP_2N_LABELS, get_task
from tapper.data.types import LampDataset, Query, Record

KEYWORDS: dict[str, tuple[str, ...]] = {
    "travel": ("passport", "airline", "itinerary", "hostel", "luggage", "cruise"),
    "education": ("classroom", "curriculum", "tutor", "semester", "homework", "syllabus"),
    "parents": ("toddler", "diaper", "babysitter", "stroller", "bedtime", "nursery"),
    "style & beauty": ("lipstick", "runway", "mascara", "hairstyle", "couture", "skincare"),
    "entertainment": ("blockbuster", "sitcom", "premiere", "celebrity", "soundtrack", "screenplay"),
    "food & drink": ("recipe", "espresso", "brunch", "sourdough", "vineyard", "barbecue"),
    "science & technology": ("quantum", "robotics", "telescope", "smartphone", "genome", "algorithm"),
    "business": ("startup", "merger", "shareholder", "invoice", "franchise", "revenue"),
    "sports": ("quarterback", "marathon", "playoff", "goalkeeper", "stadium", "referee"),
    "healthy living": ("yoga", "meditation", "vitamins", "workout", "hydration", "wellness"),
    "women": ("feminism", "suffrage", "sisterhood", "maternity", "equality", "womanhood"),
    "politics": ("senator", "ballot", "congress", "filibuster", "campaign", "legislation"),
    "crime": ("burglary", "detective", "indictment", "homicide", "forensic", "arrest"),
    "culture & arts": ("gallery", "sculpture", "poetry", "orchestra", "museum", "novelist"),
    "religion": ("pilgrimage", "sermon", "scripture", "monastery", "prayer", "cathedral"),
}
assert tuple(KEYWORDS) == LAMP_2N_LABELS

# LaMP_2M (movie tagging): the same generator over the 15 movie tags, each with six keywords of its own.
KEYWORDS_2M: dict[str, tuple[str, ...]] = {
    "sci-fi": ("spaceship", "android", "galaxy", "laser", "teleport", "cyborg"),
    "based on a book": ("novel", "adaptation", "bestseller", "author", "chapter", "manuscript"),
    "comedy": ("prank", "slapstick", "sitcom", "jokes", "hilarious", "parody"),
    "action": ("explosion", "chase", "shootout", "stuntman", "heist", "firefight"),
    "twist ending": ("reveal", "unexpected", "rug-pull", "misdirection", "switcheroo", "reversal"),
    "dystopia": ("regime", "surveillance", "wasteland", "rationing", "curfew", "propaganda"),
    "dark comedy": ("morbid", "gallows", "cynical", "macabre", "deadpan", "grotesque"),
    "classic": ("black-and-white", "golden-age", "timeless", "vintage", "landmark", "restored"),
    "psychology": ("therapist", "trauma", "obsession", "paranoia", "memory", "subconscious"),
    "fantasy": ("dragon", "wizard", "enchanted", "elves", "sorcery", "kingdom"),
    "romance": ("courtship", "wedding", "heartbreak", "lovers", "kiss", "proposal"),
    "thought-provoking": ("philosophy", "dilemma", "ethics", "meaning", "existential", "contemplative"),
    "social commentary": ("inequality", "class", "racism", "poverty", "satire", "injustice"),
    "violence": ("bloodshed", "massacre", "brutal", "gore", "assault", "carnage"),
    "true story": ("biopic", "real-life", "historical", "memoir", "documented", "survivor"),
}
assert tuple(KEYWORDS_2M) == LAMP_2M_LABELS
VOCABULARIES = {"LaMP_2N": KEYWORDS, "LaMP_2M": KEYWORDS_2M}

_SENTENCES_3 = ("A story on {} and {}, with {}.", "Notes about {}, {} and {}.", "How {} meets {} and {}.")
_SENTENCES_2 = ("A story on {} and {}.", "What {} means for {}.", "Between {} and {}.")
_TITLES = ("On {} and {}", "{} and {}: a report", "Why {} and {} matter")
_DRIFT_SIZE = 3
_INTEREST_RATE = 0.6
_INTEREST_SIZE = 4
_FIRST_DAY = dt.date(2020, 1, 1)


@dataclass(frozen=True)
class SyntheticUser:
    user_id: str
    drifts: bool
    drift_date: dt.date | None
    ranking_before: tuple[str, ...]
    ranking_after: tuple[str, ...]

    def ranking_on(self, day: dt.date) -> tuple[str, ...]:
        if self.drift_date is not None and day >= self.drift_date:
            return self.ranking_after
        return self.ranking_before

    def to_json(self) -> dict:
        return {
            "drifts": self.drifts,
            "drift_date": None if self.drift_date is None else self.drift_date.isoformat(),
            "ranking_before": list(self.ranking_before),
            "ranking_after": list(self.ranking_after),
        }


def preferred(ranking: tuple[str, ...], candidates: list[str]) -> str:
    return min(candidates, key=ranking.index)


def _article(
    rng: random.Random, ranking: tuple[str, ...], keywords: dict[str, tuple[str, ...]] = KEYWORDS
) -> tuple[list[str], str, str]:
    """(candidate categories, text, title) of an article the user with `ranking` meets.

    With probability _INTEREST_RATE one candidate comes from the user's current
    top _INTEREST_SIZE (people read, and are asked about, what they follow), so
    their preferences show up often enough in their history to be learnt.
    """
    labels = tuple(keywords)
    k = rng.choice((2, 3))
    if rng.random() < _INTEREST_RATE:
        first = rng.choice(ranking[:_INTEREST_SIZE])
        candidates = [first] + rng.sample([c for c in labels if c != first], k - 1)
        rng.shuffle(candidates)
    else:
        candidates = rng.sample(labels, k)
    words = [w for c in candidates for w in rng.sample(keywords[c], 2)]
    rng.shuffle(words)
    sentences = []
    while words:
        take = 3 if len(words) in (3, 6) or len(words) > 4 else 2
        template = rng.choice(_SENTENCES_3 if take == 3 else _SENTENCES_2)
        sentences.append(template.format(*words[:take]))
        words = words[take:]
    title_words = [rng.choice(keywords[c]) for c in candidates[:2]]
    title = rng.choice(_TITLES).format(*title_words)
    return candidates, " ".join(sentences), title[0].upper() + title[1:]


DRIFT_KINDS = ("swap", "reverse")


def _drifted(rng: random.Random, before: tuple[str, ...], kind: str = "swap") -> tuple[str, ...]:
    if kind == "reverse":
        return tuple(reversed(before))
    new_top = rng.sample(before[2 * _DRIFT_SIZE :], _DRIFT_SIZE)
    old_top = before[:_DRIFT_SIZE]
    middle = [c for c in before if c not in new_top and c not in old_top]
    return tuple(new_top) + tuple(middle) + old_top


def generate_synthetic(
    users: int = 200,
    history: tuple[int, int] = (20, 40),
    queries_per_user: int = 1,
    seed: int = 0,
    drift_fraction: float = 0.5,
    drift_at: tuple[float, float] = (0.3, 0.5),
    gap_days: tuple[int, int] = (1, 1),
    drift_kind: str = "swap",
    task: str = "LaMP_2N",
) -> tuple[LampDataset, list[SyntheticUser]]:
    low, high = history
    if not (1 <= low <= high) or users < 1 or queries_per_user < 1 or not 0 <= drift_fraction <= 1:
        raise ValueError("need users >= 1, 1 <= history min <= max, queries_per_user >= 1, 0 <= drift_fraction <= 1")
    if not 0 < drift_at[0] <= drift_at[1] < 1:
        raise ValueError(f"drift_at must satisfy 0 < low <= high < 1 (fractions of the history), got {drift_at}")
    if not 1 <= gap_days[0] <= gap_days[1]:
        raise ValueError(f"gap_days must satisfy 1 <= low <= high, got {gap_days}")
    if drift_kind not in DRIFT_KINDS:
        raise ValueError(f"drift_kind must be one of {list(DRIFT_KINDS)}, got {drift_kind!r}")
    if task not in VOCABULARIES:
        raise ValueError(f"task must be one of {list(VOCABULARIES)}, got {task!r}")
    keywords = VOCABULARIES[task]
    labels = tuple(keywords)
    rng = random.Random(seed)
    # Gaps come from their own stream, so any gap_days leaves every article and label
    # of the seed unchanged (and the default (1, 1) gives the daily dates of before).
    gap_rng = random.Random(f"{seed}-gaps")
    spec = get_task(task)
    questions: list[Query] = []
    people: list[SyntheticUser] = []
    for index in range(users):
        user_id = f"s{index:04d}"
        n = rng.randint(low, high)
        start = _FIRST_DAY + dt.timedelta(days=rng.randrange(365))
        days = [start]
        for _ in range(n + queries_per_user - 1):
            days.append(days[-1] + dt.timedelta(days=gap_rng.randint(*gap_days)))
        before = tuple(rng.sample(labels, len(labels)))
        drifts = rng.random() < drift_fraction
        drift_date = None
        after = before
        if drifts:
            # Inside the history (between drift_at of it, at least one item on each
            # side), so every query comes after the drift.
            first = min(n - 1, max(1, math.ceil(drift_at[0] * n)))
            drift_index = rng.randint(first, min(n - 1, max(first, math.floor(drift_at[1] * n))))
            drift_date = days[drift_index]
            after = _drifted(rng, before, drift_kind)
        person = SyntheticUser(user_id, drifts, drift_date, before, after)
        people.append(person)

        records: list[Record] = []
        for i in range(n):
            candidates, text, title = _article(rng, person.ranking_on(days[i]), keywords)
            answer = preferred(person.ranking_on(days[i]), candidates)
            fields = (
                {"text": text, "title": title, "category": answer}
                if task == "LaMP_2N"
                else {"description": f"{title}. {text}", "tag": answer}
            )
            records.append(Record(id=f"{user_id}-r{i:03d}", fields=fields, date=days[i], raw_date=days[i].isoformat()))
        for k in range(queries_per_user):
            day = days[n + k]
            candidates, text, title = _article(rng, person.ranking_on(day), keywords)
            model_input = (
                spec.make_input(text=text) if task == "LaMP_2N" else spec.make_input(description=f"{title}. {text}")
            )
            questions.append(
                Query(
                    id=f"{user_id}-q{k}",
                    input=model_input,
                    profile=records,
                    user_id=user_id,
                    output=preferred(person.ranking_on(day), candidates),
                )
            )
    return LampDataset(task=task, queries=questions), people


def candidates_in(text: str, task: str = "LaMP_2N") -> list[str]:
    """The labels whose keywords an article mentions (what the text alone reveals)."""
    words = set(text.lower().replace(",", " ").replace(".", " ").replace(":", " ").split())
    return [c for c, kws in VOCABULARIES[task].items() if words.intersection(kws)]


def build_synthetic(
    out: str | Path,
    users: int = 200,
    history: tuple[int, int] = (20, 40),
    queries_per_user: int = 1,
    seed: int = 0,
    drift_fraction: float = 0.5,
    drift_at: tuple[float, float] = (0.3, 0.5),
    gap_days: tuple[int, int] = (1, 1),
    drift_kind: str = "swap",
    task: str = "LaMP_2N",
) -> BuildSummary:
    ds, people = generate_synthetic(
        users, history, queries_per_user, seed, drift_fraction, drift_at, gap_days, drift_kind, task
    )
    pairs = {"history": history, "drift_at": drift_at, "gap_days": gap_days}
    command = command_line(
        "synthetic",
        {
            "out": out,
            "users": users,
            **{k: f"{v[0]} {v[1]}" for k, v in pairs.items()},
            "queries_per_user": queries_per_user,
            "seed": seed,
            "drift_fraction": drift_fraction,
            # Written only when not the default, so the command lines of earlier builds read as before.
            **({"drift_kind": drift_kind} if drift_kind != "swap" else {}),
            **({"task": task} if task != "LaMP_2N" else {}),
        },
    )
    # Pairs are two numbers on the command line, not one quoted string.
    for v in pairs.values():
        command = command.replace(f"'{v[0]} {v[1]}'", f"{v[0]} {v[1]}")
    summary = write_build(ds, out, _readme(ds, people, command, drift_kind, task))
    users_json = {"seed": seed, "users": {p.user_id: p.to_json() for p in people}}
    atomic_write_text(Path(out) / "users.json", json.dumps(users_json) + "\n")
    return summary


def _readme(
    ds: LampDataset, people: list[SyntheticUser], command: str, drift_kind: str = "swap", task: str = "LaMP_2N"
) -> str:
    drifting = sum(p.drifts for p in people)
    change = (
        "reverse their whole ranking"
        if drift_kind == "reverse"
        else "swap their top\nthree categories for three of their bottom nine"
    )
    if task == "LaMP_2M":
        change = change.replace("categories", "tags")
    text = f"""# Synthetic {task} with a drifting personalization signal

Generated data (no third-party source): free to use for any purpose (CC0).

## How it was built
```
{command}
```
Each category owns six keywords; an article mentions keywords of 2-3 candidate
categories; the gold is the user's most-preferred candidate under their ranking
of the 15 categories. Drifting users ({drifting} of {len(people)}) {change} on a drift date inside their
history; queries come after it. `users.json` holds each user's `drifts`,
`drift_date`, `ranking_before` and `ranking_after`, so evaluations can split
drifting from stable users.

## Counts
{counts_section(ds)}
"""
    if task == "LaMP_2M":
        text = text.replace("Each category owns", "Each tag owns").replace("candidate\ncategories", "candidate\ntags")
        text = text.replace("of the 15 categories", "of the 15 tags")
    return text
