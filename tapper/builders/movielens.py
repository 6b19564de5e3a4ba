"""A LaMP-3-style personalized rating task from MovieLens (ml-latest-small).

The query is a movie ("Heat (1995) genres: Action, Crime, Thriller"), the gold
the user's rating rounded half up onto LaMP-3's 1..5 (0.5 -> 1, 3.5 -> 4); the
profile is the user's earlier ratings with their dates, each a record with
LaMP-3's fields `text` (the same movie description) and `score`. The task
name stays LaMP_3 so every LaMP-3 tool applies; the query wording is
tasks.MOVIE_RATING_TEMPLATE, which `TaskSpec.adapted_to` recognises, so
history records become examples with the same wording.

Ratings with the same timestamp are ordered by movie id, so builds are
deterministic. Dates are the UTC calendar date of the Unix timestamp.
"""

from __future__ import annotations

import csv
import datetime as dt
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from tapper.atomic import atomic_write
from tapper.builders.common import BuildSummary, command_line, counts_section, write_build
from tapper.data.chronology import parse_lamp_date
from tapper.data.tasks import MOVIE_RATING_TEMPLATE
from tapper.data.types import LampDataset, Query, Record

ATTRIBUTION = (
    "F. Maxwell Harper and Joseph A. Konstan. 2015. The MovieLens Datasets: History and Context. "
    "ACM Transactions on Interactive Intelligent Systems (TiiS) 5, 4: 19:1-19:19. "
    "https://doi.org/10.1145/2827872"
)
LICENCE = (
    "Research use only, no commercial use, per the MovieLens usage licence (README.txt, copied "
    "alongside as the licence requires). Acknowledge the dataset by citing the paper above. "
    "Redistribution of this transformation is allowed under the same terms."
)

_YEAR = re.compile(r"^(?P<name>.*?)\s*\((?P<year>\d{4})(?:[-\u2013]\d{0,4})?\)\s*$")


@dataclass(frozen=True)
class Rating:
    user: int
    movie: int
    rating: float
    timestamp: int


def rating_label(stars: float) -> str:
    """Half-up rounding onto 1..5: 0.5 -> 1, 2.5 -> 3, 4.5 -> 5."""
    return str(min(5, max(1, math.floor(stars + 0.5))))


def movie_text(title: str, genres: str) -> str:
    """'Toy Story (1995) genres: Adventure, Animation' (titles without a year keep no year)."""
    match = _YEAR.match(title.strip())
    name = match.group("name") if match else title.strip()
    year = f" ({match.group('year')})" if match else ""
    genre_list = "none" if genres.strip() in ("", "(no genres listed)") else ", ".join(genres.split("|"))
    return f"{name}{year} genres: {genre_list}"


def read_movies(path: Path) -> dict[int, str]:
    with open(path, encoding="utf-8", newline="") as handle:
        return {int(row["movieId"]): movie_text(row["title"], row["genres"]) for row in csv.DictReader(handle)}


def read_ratings(path: Path, progress: bool = True) -> list[Rating]:
    out = []
    with open(path, encoding="utf-8", newline="") as handle:
        rows = tqdm(csv.DictReader(handle), desc=f"reading {path.name}", unit=" ratings", disable=not progress)
        for line, row in enumerate(rows, start=2):
            try:
                out.append(Rating(int(row["userId"]), int(row["movieId"]), float(row["rating"]), int(row["timestamp"])))
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(f"{path}:{line}: not a MovieLens rating row ({error!r})") from None
    return out


def utc_date(timestamp: int) -> str:
    return dt.datetime.fromtimestamp(timestamp, tz=dt.timezone.utc).date().isoformat()


def build_movielens_dataset(
    ratings: list[Rating],
    movies: dict[int, str],
    queries_per_user: int = 1,
    min_history: int = 5,
    max_users: int | None = None,
    max_history: int | None = 200,
) -> LampDataset:
    if queries_per_user < 1 or min_history < 0:
        raise ValueError("queries_per_user must be >= 1 and min_history >= 0")
    by_user: dict[int, list[Rating]] = {}
    for rating in ratings:
        by_user.setdefault(rating.user, []).append(rating)
    # Most active first (ratings before any cap), ties by user id.
    ranked = sorted(by_user, key=lambda user: (-len(by_user[user]), user))
    eligible = [u for u in ranked if len(by_user[u]) - queries_per_user >= min_history]
    if max_users is not None:
        eligible = eligible[:max_users]

    questions: list[Query] = []
    for user in eligible:
        items = sorted(by_user[user], key=lambda r: (r.timestamp, r.movie))
        profile, queries = items[:-queries_per_user], items[-queries_per_user:]
        if max_history is not None:
            profile = profile[-max_history:]
        records = [_record(r, movies) for r in profile]
        for rating in queries:
            questions.append(
                Query(
                    id=f"u{user}-m{rating.movie}",
                    input=MOVIE_RATING_TEMPLATE.format(text=_movie(rating.movie, movies)),
                    profile=records,
                    user_id=f"u{user}",
                    output=rating_label(rating.rating),
                )
            )
    return LampDataset(task="LaMP_3", queries=questions)


def _movie(movie_id: int, movies: dict[int, str]) -> str:
    try:
        return movies[movie_id]
    except KeyError:
        raise ValueError(f"movie {movie_id} is rated but missing from movies.csv") from None


def _record(rating: Rating, movies: dict[int, str]) -> Record:
    raw_date = utc_date(rating.timestamp)
    return Record(
        id=f"u{rating.user}-m{rating.movie}",
        fields={"text": _movie(rating.movie, movies), "score": rating_label(rating.rating)},
        date=parse_lamp_date(raw_date),
        raw_date=raw_date,
    )


def build_movielens(
    source: str | Path,
    out: str | Path,
    queries_per_user: int = 1,
    min_history: int = 5,
    max_users: int | None = None,
    max_history: int | None = 200,
    progress: bool = True,
) -> BuildSummary:
    """Read ratings.csv and movies.csv from `source`, write a LaMP_3 build (plus README.txt) into `out`."""
    source = Path(source)
    ratings = read_ratings(source / "ratings.csv", progress=progress)
    movies = read_movies(source / "movies.csv")
    ds = build_movielens_dataset(ratings, movies, queries_per_user, min_history, max_users, max_history)
    command = command_line(
        "movielens",
        {
            "source": source,
            "out": out,
            "queries_per_user": queries_per_user,
            "min_history": min_history,
            "max_users": max_users,
            "max_history": max_history,
        },
    )
    summary = write_build(ds, out, _readme(ds, command, len(ratings)))
    licence_file = source / "README.txt"
    if licence_file.exists():
        # The MovieLens licence must travel with any redistribution.
        atomic_write(Path(out) / "README.txt", lambda tmp: shutil.copyfile(licence_file, tmp))
    return summary


def _readme(ds: LampDataset, command: str, n_ratings: int) -> str:
    return f"""# LaMP_3-style personalized movie rating, built from MovieLens

In LaMP's file format (questions.json, outputs.json), task LaMP_3.

## Source and licence
- MovieLens ml-latest-small: {n_ratings} ratings read.
- Cite: {ATTRIBUTION}
- Licence: {LICENCE}

## How it was built
```
{command}
```
The query is a user's latest rating(s): "{MOVIE_RATING_TEMPLATE.format(text="<title> (<year>) genres: <genres>")}".
The gold is the rating rounded half up to 1..5 (0.5 -> 1). The profile is the user's earlier
ratings (most recent `--max-history` kept), each with `text` (the movie), `score` and the UTC `date`.

## Counts
{counts_section(ds)}
"""
