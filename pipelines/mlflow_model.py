"""MLflow "model from code" for a TAP-PER model (no pickled Python object in the registry).

Artifacts of the logged model:
    tapper_state/      prefix.safetensors + tapper_config.json (TapPer.save)
    backbone.json      where the merged Stage-1 backbone lives (ZenML artifact URI) and its weights hash
    stage1_backbone/   the backbone itself, when the run was asked to log it (GPU stacks)
    histories.jsonl    optional: the Stage-2 users' stored histories (deploy.histories), which P_q reads

predict() takes a pandas DataFrame of `user_id, input[, date][, history][, id]` rows and returns a Series of
predictions (deploy.batch_scoring: the serving code path, so the registry and `tapper serve` answer alike):

    mlflow.pyfunc.load_model("models:/tapper-LaMP_2N@production").predict(df)

It also still takes LaMP questions (dicts, or a DataFrame with a `profile` column: id, input, profile, user_id)
and returns a list of answers, the format of earlier versions.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class TapperModel(PythonModel):
    def load_context(self, context):
        from deploy.batch_scoring import BatchScorer

        ref = json.loads(Path(context.artifacts["backbone_ref"]).read_text())
        backbone_dir = context.artifacts.get("stage1_backbone") or ref["uri"]
        self.scorer = BatchScorer.from_dirs(
            context.artifacts["tapper_state"],
            backbone_dir,
            ref["task"],
            histories=context.artifacts.get("histories"),
            version=str(ref.get("weights_hash", ""))[:12] or "mlflow",
        )
        self.task = self.scorer.ld.task

    # The type hint says what pyfunc hands over after checking the input against the logged signature (a
    # DataFrame); MLflow infers no schema from it, so the signature stays the one register_model logs.
    def predict(self, context, model_input: pd.DataFrame, params=None):
        columns = getattr(model_input, "columns", None)
        if columns is not None and "profile" not in columns:
            return self.scorer.score(model_input)
        return self._predict_questions(model_input)

    def _predict_questions(self, model_input):
        """LaMP questions (id, input, profile, user_id): each answered with its own profile as the history."""
        from deploy.inference import PredictJob
        from tapper.data.chronology import parse_lamp_date
        from tapper.data.types import Record

        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        jobs = []
        for q in rows:
            profile = [
                Record(
                    id=str(r["id"]),
                    fields={k: str(v) for k, v in r.items() if k not in ("id", "date")},
                    date=parse_lamp_date(r.get("date")),
                    raw_date=r.get("date"),
                )
                for r in q.get("profile", [])
            ]
            jobs.append(
                PredictJob(
                    user_id=str(q.get("user_id", q["id"])), text=q["input"], history=profile, query_id=str(q["id"])
                )
            )
        out = []
        for a in range(0, len(jobs), self.scorer.batch_size):
            for result in self.scorer.predictor.run(jobs[a : a + self.scorer.batch_size]):
                if isinstance(result, BaseException):
                    raise result
                out.append(result["prediction"])
        return out


mlflow.models.set_model(TapperModel())
