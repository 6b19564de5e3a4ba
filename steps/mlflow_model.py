"""MLflow "model from code" for a TAP-PER model (no pickled Python object in the registry).

Artifacts of the logged model:
    tapper_state/      prefix.safetensors + tapper_config.json (TapPer.save)
    backbone.json      where the merged Stage-1 backbone lives (ZenML artifact URI) and its weights hash
    stage1_backbone/   the backbone itself, when the run was asked to log it (GPU stacks)

predict() takes LaMP questions (dicts with id, input, profile, user_id) and
returns the model's answers.
"""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
from mlflow.pyfunc import PythonModel


class TapperModel(PythonModel):
    def load_context(self, context):
        from tapper.data import get_task
        from tapper.model.backbone import load_backbone_dir
        from tapper.model.tapper import TapPer

        ref = json.loads(Path(context.artifacts["backbone_ref"]).read_text())
        backbone_dir = context.artifacts.get("stage1_backbone") or ref["uri"]
        self.bb = load_backbone_dir(backbone_dir)
        self.model = TapPer.load(context.artifacts["tapper_state"], self.bb.model)
        self.task = get_task(ref["task"])

    def predict(self, context, model_input, params=None):
        from tapper.data.splits import query_example
        from tapper.data.types import Query, Record
        from tapper.eval.predict import generate_texts
        from tapper.experiment import embedding_cache
        from tapper.train.stage2 import encoder_for

        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        examples = []
        for q in rows:
            profile = [Record(id=str(r["id"]), fields={k: str(v) for k, v in r.items() if k not in ("id", "date")},
                              date=None, raw_date=r.get("date")) for r in q.get("profile", [])]
            examples.append(query_example(Query(id=str(q["id"]), input=q["input"], profile=profile, user_id=str(q.get("user_id", q["id"])))))
        enc = encoder_for(self.model, self.task, self.bb.tokenizer, embedding_cache(self.bb))
        # Batch scoring serves users the model never saw as the server does: P_q only.
        encoded = enc.encode(examples, self.model.user_rows if self.model.cfg.use_pu else None, progress=False,
                             unknown_users="pq_only")
        preds = generate_texts(self.model, encoded, self.bb.tokenizer, self.task, progress=False)
        return [preds[e.id] for e in examples]


mlflow.models.set_model(TapperModel())
