"""Batch scoring: a pandas DataFrame of (user_id, input[, date][, history][, id]) through the serving code path.

    scorer = BatchScorer.from_dirs(state_dir, stage1_dir, "LaMP_2N", histories=path_to_histories_jsonl)
    scorer.score(df)   # -> pandas Series "prediction", aligned with df's index

This is what the MLflow model registered by the pipeline runs (pipelines/mlflow_model.py), so that
`mlflow.pyfunc.load_model("models:/<name>@production").predict(df)` answers exactly what `tapper serve` answers
for the same user, input and date: the same Predictor (deploy.inference), batches included, on the users'
stored histories (the `histories` artifact, the Stage-2 users' records) plus any per-row `history`.

Columns: `user_id` and `input` (the task's full input text) are required; `date` (YYYY-MM-DD or YYYY, a date or
a timestamp; missing: the latest history date), `history` (a list of LaMP profile items used in addition to the
stored ones, not stored) and `id` are optional. A bad value raises a ValueError naming the row and column.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from pathlib import Path

from deploy.bundle import BundleInfo
from deploy.histories import HistoryStore, record_from_json
from deploy.inference import PredictJob, Predictor
from deploy.loaded import Loaded
from tapper.data.chronology import parse_lamp_date

REQUIRED = ("user_id", "input")
OPTIONAL = ("date", "history", "id")


class BatchScorer:
    def __init__(self, ld: Loaded, batch_size: int = 16, max_new_tokens: int | None = None):
        self.ld = ld
        self.batch_size = batch_size
        self.predictor = Predictor(ld, "tapper", rag_k=4, default_max_new_tokens=max_new_tokens)

    @classmethod
    def from_dirs(
        cls,
        state_dir: str | Path,
        stage1_dir: str | Path,
        task: str,
        histories: str | Path | None = None,
        version: str = "mlflow",
        **kw,
    ) -> "BatchScorer":
        from tapper.model.backbone import load_backbone_dir
        from tapper.model.tapper import TapPer

        state_dir, stage1_dir = Path(state_dir), Path(stage1_dir)
        bb = load_backbone_dir(stage1_dir)
        model = TapPer.load(state_dir, bb.model)
        meta = json.loads((state_dir / "tapper_config.json").read_text())
        info = BundleInfo(path=state_dir, task=task, version=version, backbone_hash=meta.get("backbone_hash", ""))
        store = HistoryStore.read(histories) if histories else HistoryStore()
        ld = Loaded(
            bundle=info,
            bundle_id="batch",
            task=info.task_spec(),
            backbone=bb,
            model=model,
            histories=store,
            generation=None,
            sequence=0,
            loaded_at=time.time(),
        )
        return cls(ld, **kw)

    def jobs(self, df) -> list[PredictJob]:
        missing = [c for c in REQUIRED if c not in df.columns]
        if missing:
            raise ValueError(
                f"batch scoring needs columns {list(REQUIRED)} (optional {list(OPTIONAL)}); missing {missing}"
            )
        unknown = [c for c in df.columns if c not in REQUIRED + OPTIONAL]
        if unknown:
            raise ValueError(f"unknown columns {unknown}; expected {list(REQUIRED)} and optionally {list(OPTIONAL)}")
        out = []
        for n, (index, row) in enumerate(df.iterrows()):
            where = f"row {index!r}"
            user, text = row["user_id"], row["input"]
            if _missing(user) or _missing(text) or not str(text).strip():
                raise ValueError(f"{where}: user_id and input must be given")
            history = []
            if "history" in df.columns and not _missing(row["history"]):
                items = row["history"]
                if isinstance(items, str):
                    items = json.loads(items)
                history = [record_from_json(item, f"{where}, column 'history' [{i}]") for i, item in enumerate(items)]
            rid = row["id"] if "id" in df.columns and not _missing(row["id"]) else f"row-{n}"
            out.append(
                PredictJob(
                    user_id=str(user),
                    text=str(text),
                    history=history,
                    query_date=_date(row["date"], where) if "date" in df.columns else None,
                    query_id=str(rid),
                )
            )
        return out

    def score(self, df):
        import pandas as pd

        jobs = self.jobs(df)
        predictions = []
        for a in range(0, len(jobs), self.batch_size):
            for result in self.predictor.run(jobs[a : a + self.batch_size]):
                if isinstance(result, BaseException):
                    raise result
                predictions.append(result["prediction"])
        return pd.Series(predictions, index=df.index, name="prediction", dtype=object)


def _missing(value) -> bool:
    if value is None:
        return True
    try:
        return bool(isinstance(value, float) and math.isnan(value)) or str(value) in ("NaT", "nan")
    except TypeError:
        return False


def _date(value, where: str) -> dt.date | None:
    if _missing(value):
        return None
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    try:
        return parse_lamp_date(str(value) if not isinstance(value, int) else value)
    except ValueError as err:
        raise ValueError(f"{where}, column 'date': {err}") from None
