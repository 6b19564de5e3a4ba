"""A tiny synthetic LaMP_2N dataset for the workflow tests (written with tapper.data's own writers)."""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

from tapper.data import write_outputs, write_questions
from tapper.data.tasks import LAMP_2N_LABELS
from tapper.data.types import LampDataset, Query, Record

WORDS = ["market", "team", "recipe", "vote", "school", "flight", "court", "film", "church", "gene", "diet", "style"]


def make_lamp_2n(
    directory: Path, users: int = 8, records: int = 6, queries: int = 2, seed: int = 0, n_favorites: int = 4
) -> tuple[Path, Path]:
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
            profile.append(
                Record(
                    id=f"u{u}r{r}",
                    fields={"text": f"{cat} {words}", "title": words[:20], "category": cat},
                    date=day,
                    raw_date=day.isoformat(),
                )
            )
        for k in range(queries):
            text = " ".join(rng.choice(WORDS) for _ in range(6))
            from tapper.data import get_task

            ds.queries.append(
                Query(
                    id=f"q{u}-{k}",
                    input=get_task("LaMP_2N").make_input(text=text),
                    profile=profile,
                    user_id=f"user{u}",
                    output=fav,
                )
            )
    directory.mkdir(parents=True, exist_ok=True)
    q = write_questions(ds, directory / "questions.json")
    o = write_outputs("LaMP_2N", {x.id: x.output for x in ds.queries}, directory / "outputs.json")
    return Path(q), Path(o)


def reset_zenml() -> None:
    """Forget ZenML's global config and client, so that the next use reads the (new) environment."""
    import sys

    if "zenml.client" in sys.modules:
        from zenml.client import Client
        from zenml.config.global_config import GlobalConfiguration

        Client._reset_instance()
        GlobalConfiguration._reset_instance()


def isolated_workflow(tmp: Path):
    """Generator for a module fixture: an isolated ZenML + MLflow + tapper cache in `tmp`, the local
    stack registered, and a tiny LaMP_2N; yields {"tmp", "questions", "outputs", "runs"}."""
    import os

    env = {
        "ZENML_CONFIG_PATH": str(tmp / "zenml-config"),
        "ZENML_LOCAL_STORES_PATH": str(tmp / "zenml-stores"),
        "TAPPER_HOME": str(tmp / "project"),
        "TAPPER_CACHE": str(tmp / "tapper-cache"),
        "ZENML_ANALYTICS_OPT_IN": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "ZENML_AUTO_OPEN_DASHBOARD": "false",
        "HF_HUB_OFFLINE": "1",
        "ZENML_ENABLE_RICH_TRACEBACK": "false",
        "ZENML_LOGGING_VERBOSITY": "WARN",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    reset_zenml()  # another test module may have used (and isolated) ZenML before this one
    (tmp / "project").mkdir()
    from pipelines.stacks import stack_up

    stack_up("local")
    q, o = make_lamp_2n(tmp / "data", users=8, records=6, queries=2, n_favorites=1)
    yield {"tmp": tmp, "questions": str(q), "outputs": str(o), "runs": {}}
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    reset_zenml()
