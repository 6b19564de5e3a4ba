"""LaMP-2N and LaMP-4 from the HuffPost News Category Dataset, the way LaMP built them.

Users are single authors; each author's articles are sorted by date, the
latest `queries_per_user` are the queries and every earlier one is the
profile. LaMP-2N keeps only articles whose category maps onto its 15 labels;
LaMP-4 asks for the headline given the short description.

Decisions (the LaMP paper does not spell them out):
- Single author. A byline is one person when it has no " and " (any case),
  no "&", and at most one comma; one comma is "Name, Affiliation" (e.g.
  "Carla K. Johnson, AP"), two or more list several people. The byline string
  itself is the user id (we do not merge "Name" with "Name, AP": that would
  be a guess). On the shared 2018-2022 subset this gives 1,118 single-author
  bylines, 83 of them with >= 20 articles; the data README's "901
  single-author authors" could not be reproduced by any rule we tried, the
  ">= 20" count matches.
- Articles with an empty headline or short description are dropped (the
  full v3 file has many empty descriptions; they make empty inputs).
- Ties in date keep the file's order reversed: HuffPost files list the
  newest article first.
- Record ids are "n" + the first 12 hex digits of the SHA-1 of the article
  link: stable across builds and across the subset and the full file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from tapper.builders.common import BuildSummary, command_line, counts_section, write_build
from tapper.data.chronology import parse_lamp_date
from tapper.data.tasks import canonical_task_name, get_task
from tapper.data.types import LampDataset, Query, Record

NEWS_TASKS = ("LaMP_2N", "LaMP_4")

# The source's category -> LaMP-2N label. The 29 categories of the shared
# subset, plus the names the full v3 file uses for the same labels (STYLE,
# TASTE, ARTS, ARTS & CULTURE, HEALTHY LIVING, PARENTS). Categories with no
# LaMP-2N label (WORLD NEWS, U.S. NEWS, COMEDY, MEDIA, WEIRD NEWS, *VOICES,
# HOME & LIVING, ENVIRONMENT, GREEN, IMPACT, MONEY, WEDDINGS, DIVORCE,
# COLLEGE, FIFTY, GOOD NEWS, WORLDPOST, ...) are left out rather than forced
# onto a label.
CATEGORY_TO_LAMP_2N = {
    "TRAVEL": "travel",
    "EDUCATION": "education",
    "PARENTING": "parents",
    "PARENTS": "parents",
    "STYLE & BEAUTY": "style & beauty",
    "STYLE": "style & beauty",
    "ENTERTAINMENT": "entertainment",
    "FOOD & DRINK": "food & drink",
    "TASTE": "food & drink",
    "TECH": "science & technology",
    "SCIENCE": "science & technology",
    "BUSINESS": "business",
    "SPORTS": "sports",
    "WELLNESS": "healthy living",
    "HEALTHY LIVING": "healthy living",
    "WOMEN": "women",
    "POLITICS": "politics",
    "CRIME": "crime",
    "CULTURE & ARTS": "culture & arts",
    "ARTS & CULTURE": "culture & arts",
    "ARTS": "culture & arts",
    "RELIGION": "religion",
}

ATTRIBUTION = (
    'R. Misra, "News Category Dataset", arXiv:2209.11429 (2022). '
    "Version 3 is released under CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/); "
    "version 2 under CC0."
)


@dataclass(frozen=True)
class Article:
    record_id: str
    author: str
    date: str  # YYYY-MM-DD, as in the source
    headline: str
    description: str
    category: str
    order: int  # position in the source, to break ties in date


def is_single_author(byline: str) -> bool:
    text = byline.strip()
    if not text or "&" in text or " and " in text.lower():
        return False
    return text.count(",") <= 1


def article_id(link: str) -> str:
    return "n" + hashlib.sha1(link.encode("utf-8")).hexdigest()[:12]


def source_files(source: str | Path) -> list[Path]:
    """A .json/.jsonl file, or every such file in a directory (sorted, for determinism)."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix in (".jsonl", ".json"))
        if not files:
            raise FileNotFoundError(
                f"no .jsonl or .json files in {source}; pass --source with the News Category file or its directory"
            )
        return files
    if not source.exists():
        raise FileNotFoundError(
            f"no News Category data at {source}; pass --source with the file or its directory "
            "(the project's copy is ../shared/data/news_category)"
        )
    return [source]


def read_articles(files: list[Path], progress: bool = True) -> list[Article]:
    """Single-author articles with text, deduplicated by link. Bad lines raise with file and line."""
    articles: list[Article] = []
    seen_links: set[str] = set()
    order = 0
    for path in files:
        with open(path, encoding="utf-8") as handle:
            lines = tqdm(handle, desc=f"reading {path.name}", unit=" lines", disable=not progress)
            for line_number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    link, byline = row["link"], row["authors"]
                    headline, description = row["headline"].strip(), row["short_description"].strip()
                    category, date = row["category"].strip().upper(), row["date"][:10]
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
                    raise ValueError(f"{path}:{line_number}: not a News Category row ({error!r})") from None
                order += 1
                if link in seen_links or not is_single_author(byline) or not headline or not description:
                    continue
                seen_links.add(link)
                articles.append(Article(article_id(link), byline.strip(), date, headline, description, category, order))
    return articles


def _record(article: Article, task: str) -> Record:
    fields = {"text": article.description, "title": article.headline}
    if task == "LaMP_2N":
        fields["category"] = CATEGORY_TO_LAMP_2N[article.category]
    try:
        date = parse_lamp_date(article.date)
    except ValueError as error:
        raise ValueError(f"article {article.record_id} by {article.author!r}: {error}") from None
    return Record(id=article.record_id, fields=fields, date=date, raw_date=article.date)


def build_news_dataset(
    articles: list[Article],
    task: str = "LaMP_2N",
    queries_per_user: int = 1,
    min_history: int = 5,
    max_users: int | None = None,
    max_history: int | None = None,
) -> LampDataset:
    task = canonical_task_name(task)
    if task not in NEWS_TASKS:
        raise ValueError(f"news builds {', '.join(NEWS_TASKS)}, not {task}")
    if queries_per_user < 1 or min_history < 0:
        raise ValueError("queries_per_user must be >= 1 and min_history >= 0")
    spec = get_task(task)
    by_author: dict[str, list[Article]] = {}
    for article in articles:
        if task == "LaMP_2N" and article.category not in CATEGORY_TO_LAMP_2N:
            continue
        by_author.setdefault(article.author, []).append(article)

    users: list[tuple[str, list[Article], list[Article]]] = []
    for author, items in by_author.items():
        # Oldest first; same-day articles: later in the file = older.
        items.sort(key=lambda a: (a.date, -a.order))
        profile, queries = items[:-queries_per_user], items[-queries_per_user:]
        if len(profile) < min_history or len(queries) < queries_per_user:
            continue
        if max_history is not None:
            profile = profile[-max_history:]
        users.append((author, profile, queries))
    # Most active first (by articles in the profile before any cap), ties by name.
    users.sort(key=lambda u: (-len(by_author[u[0]]), u[0]))
    if max_users is not None:
        users = users[:max_users]

    questions: list[Query] = []
    for author, profile, queries in users:
        records = [_record(a, task) for a in profile]
        for article in queries:
            gold = CATEGORY_TO_LAMP_2N[article.category] if task == "LaMP_2N" else article.headline
            questions.append(
                Query(
                    id=article.record_id,
                    input=spec.make_input(text=article.description),
                    profile=records,
                    user_id=author,
                    output=gold,
                )
            )
    return LampDataset(task=task, queries=questions)


def build_news(
    source: str | Path,
    out: str | Path,
    task: str = "LaMP_2N",
    queries_per_user: int = 1,
    min_history: int = 5,
    max_users: int | None = None,
    max_history: int | None = None,
    progress: bool = True,
) -> BuildSummary:
    """Read the News Category file(s) at `source` and write a LaMP build into `out`."""
    task = canonical_task_name(task)
    files = source_files(source)
    articles = read_articles(files, progress=progress)
    ds = build_news_dataset(articles, task, queries_per_user, min_history, max_users, max_history)
    command = command_line(
        "news",
        {
            "task": task,
            "source": source,
            "out": out,
            "queries_per_user": queries_per_user,
            "min_history": min_history,
            "max_users": max_users,
            "max_history": max_history,
        },
    )
    return write_build(ds, out, _readme(ds, files, command, len(articles)))


def _readme(ds: LampDataset, files: list[Path], command: str, single_author_articles: int) -> str:
    task_line = {
        "LaMP_2N": "LaMP-2N, personalized news categorization (15 labels)",
        "LaMP_4": "LaMP-4, personalized news headline generation",
    }[ds.task]
    mapping = ""
    if ds.task == "LaMP_2N":
        rows = "\n".join(f"| {source} | {label} |" for source, label in CATEGORY_TO_LAMP_2N.items())
        mapping = (
            "\n## Category mapping\n\nSource categories not listed here have no LaMP-2N label and were dropped.\n\n"
            "| source category | LaMP-2N label |\n|---|---|\n" + rows + "\n"
        )
    return f"""# {ds.task} built from the News Category Dataset

{task_line}, in LaMP's file format (questions.json, outputs.json).

## Source and licence
- Source files: {", ".join(p.name for p in files)}
- {ATTRIBUTION}
- This derived dataset is shared under the same licence (CC BY 4.0), with the attribution above.

## How it was built
```
{command}
```
Users are single authors (a byline with no " and ", no "&" and at most one comma,
which separates an affiliation: "Name, AP"). Each author's articles are sorted by
date; the latest ones are the queries, all earlier ones the profile (fields `text`
= short description, `title` = headline{", `category`" if ds.task == "LaMP_2N" else ""}, `date`).
Single-author articles with text read: {single_author_articles}.

## Counts
{counts_section(ds)}
{mapping}"""
