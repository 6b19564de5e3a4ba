"""A tiny synthetic LaMP_2N dataset for the workflow tests (written with tapper.data's own writers)."""
from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

from tapper.data import write_outputs, write_questions
from tapper.data.tasks import LAMP_2N_LABELS
from tapper.data.types import LampDataset, Query, Record

WORDS = ["market", "team", "recipe", "vote", "school", "flight", "court", "film", "church", "gene", "diet", "style"]


def make_lamp_2n(directory: Path, users: int = 8, records: int = 6, queries: int = 2, seed: int = 0,
                 n_favorites: int = 4) -> tuple[Path, Path]:
    """Users favour one of `n_favorites` categories (80% of their records); queries ask for the favourite."""
    rng = random.Random(seed)
    labels = list(LAMP_2N_LABELS)
    ds = LampDataset(task="LaMP_2N")
    for u in range(users):
        fav = labels[u % n_favorites]
        profile = []
        day = dt.date(2020, 1, 1) + dt.timedelta(days=u)
        for r in range(records + u % 3):
            cat = fav if rng.random() < 0.8 else rng.choice(labels)
            words = " ".join(rng.choice(WORDS) for _ in range(6))
            day += dt.timedelta(days=rng.randint(1, 20))
            profile.append(Record(id=f"u{u}r{r}", fields={"text": f"{cat} {words}", "title": words[:20], "category": cat},
                                  date=day, raw_date=day.isoformat()))
        for k in range(queries):
            text = " ".join(rng.choice(WORDS) for _ in range(6))
            from tapper.data import get_task

            ds.queries.append(Query(id=f"q{u}-{k}", input=get_task("LaMP_2N").make_input(text=text), profile=profile,
                                    user_id=f"user{u}", output=fav))
    directory.mkdir(parents=True, exist_ok=True)
    q = write_questions(ds, directory / "questions.json")
    o = write_outputs("LaMP_2N", {x.id: x.output for x in ds.queries}, directory / "outputs.json")
    return Path(q), Path(o)
