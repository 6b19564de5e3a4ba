"""Materializers for input data: the raw LaMP files, the validated dataset, and its splits.

Stored as LaMP's own JSON formats (questions.json / outputs.json), so an
artifact can be fed straight back to `tapper train --questions --outputs`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any, ClassVar, Dict, Tuple, Type

from zenml.enums import ArtifactType, VisualizationType
from zenml.materializers.base_materializer import BaseMaterializer

from materializers._io import download_file, upload_file, md_table, read_json, write_json, write_text
from materializers.types import LampFiles
from tapper.data.types import LampDataset
from tapper.data.prepared import PreparedData

QUESTIONS, OUTPUTS, META = "questions.json", "outputs.json", "meta.json"


class LampFilesMaterializer(BaseMaterializer):
    ASSOCIATED_TYPES: ClassVar[Tuple[Type[Any], ...]] = (LampFiles,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA

    def save(self, data: LampFiles) -> None:
        for name, blob in ((QUESTIONS, data.questions_bytes), (OUTPUTS, data.outputs_bytes)):
            with self.artifact_store.open(os.path.join(self.uri, name), "wb") as f:
                f.write(blob)
        write_json(self.artifact_store, os.path.join(self.uri, META), data.meta())

    def load(self, data_type: Type[Any]) -> LampFiles:
        meta = read_json(self.artifact_store, os.path.join(self.uri, META))
        blobs = {}
        for name in (QUESTIONS, OUTPUTS):
            with self.artifact_store.open(os.path.join(self.uri, name), "rb") as f:
                blobs[name] = f.read()
        return LampFiles(questions_bytes=blobs[QUESTIONS], outputs_bytes=blobs[OUTPUTS], **meta)

    def extract_metadata(self, data: LampFiles) -> Dict[str, Any]:
        return {
            "questions_file": data.questions_name,
            "outputs_file": data.outputs_name,
            "questions_sha256": data.questions_sha256,
            "outputs_sha256": data.outputs_sha256,
            "questions_bytes": len(data.questions_bytes),
            "outputs_bytes": len(data.outputs_bytes),
        }

    def compute_content_hash(self, data: LampFiles) -> str:
        return hashlib.sha256((data.questions_sha256 + data.outputs_sha256 + str(data.task)).encode()).hexdigest()


def dataset_summary(ds: LampDataset) -> dict:
    records = sum(len(q.profile) for q in ds.queries)
    lengths = [len(q.profile) for q in ds.queries] or [0]
    return {
        "task": ds.task,
        "users": len(ds.users()),
        "queries": len(ds.queries),
        "records": records,
        "history_min": min(lengths),
        "history_max": max(lengths),
        "history_mean": round(sum(lengths) / len(lengths), 2),
    }


def _write_lamp(ds: LampDataset, directory: str) -> None:
    from tapper.data import golds_of, write_outputs, write_questions

    write_questions(ds, os.path.join(directory, QUESTIONS))
    write_outputs(ds.task, golds_of(ds), os.path.join(directory, OUTPUTS))


def _read_lamp(store, uri: str, task: str) -> LampDataset:
    from tapper.data import load_lamp

    with tempfile.TemporaryDirectory(prefix="tapper-ds-") as tmp:
        for name in (QUESTIONS, OUTPUTS):
            download_file(store, os.path.join(uri, name), os.path.join(tmp, name))
        return load_lamp(os.path.join(tmp, QUESTIONS), os.path.join(tmp, OUTPUTS), task)


class LampDatasetMaterializer(BaseMaterializer):
    """A validated LaMP dataset, stored in LaMP's file formats."""

    ASSOCIATED_TYPES: ClassVar[Tuple[Type[Any], ...]] = (LampDataset,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA

    def save(self, data: LampDataset) -> None:
        with tempfile.TemporaryDirectory(prefix="tapper-ds-") as tmp:
            _write_lamp(data, tmp)
            for name in (QUESTIONS, OUTPUTS):
                upload_file(self.artifact_store, os.path.join(tmp, name), os.path.join(self.uri, name))
        write_json(self.artifact_store, os.path.join(self.uri, META), {"task": data.task})

    def load(self, data_type: Type[Any]) -> LampDataset:
        meta = read_json(self.artifact_store, os.path.join(self.uri, META))
        return _read_lamp(self.artifact_store, self.uri, meta["task"])

    def extract_metadata(self, data: LampDataset) -> Dict[str, Any]:
        return dataset_summary(data)

    def save_visualizations(self, data: LampDataset) -> Dict[str, VisualizationType]:
        s = dataset_summary(data)
        text = f"# LaMP dataset ({data.task})\n\n" + md_table(["quantity", "value"], [[k, v] for k, v in s.items()])
        path = os.path.join(self.uri, "summary.md")
        write_text(self.artifact_store, path, text)
        return {path: VisualizationType.MARKDOWN}


def split_manifest(data: PreparedData) -> dict:
    s = data.splits
    return {
        "task": data.task.name,
        "input_template": data.task.input_template,
        "stage2_users": s.stage2_users,
        "stage1_users": s.stage1_users,
        "stage1_examples": [e.id for e in s.stage1_train],
        "stage2_examples": [e.id for e in s.stage2_train],
        "eval_examples": [e.id for e in s.eval],
        "n_users": data.n_users,
        "n_records": data.n_records,
    }


class PreparedDataMaterializer(BaseMaterializer):
    """Splits (Stage-1 users / Stage-2 users / evaluation), stored without copying histories.

    The dataset is stored once (LaMP files) with a manifest of user and example
    ids per split; loading rebuilds the splits with tapper.data.make_splits
    (deterministic) and checks that they match the manifest exactly.
    """

    ASSOCIATED_TYPES: ClassVar[Tuple[Type[Any], ...]] = (PreparedData,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA

    def save(self, data: PreparedData) -> None:
        ds = _dataset_of(data)
        with tempfile.TemporaryDirectory(prefix="tapper-splits-") as tmp:
            _write_lamp(ds, tmp)
            for name in (QUESTIONS, OUTPUTS):
                upload_file(self.artifact_store, os.path.join(tmp, name), os.path.join(self.uri, name))
        write_json(self.artifact_store, os.path.join(self.uri, "splits.json"), split_manifest(data))

    def load(self, data_type: Type[Any]) -> PreparedData:
        from tapper.data import get_task, make_splits

        manifest = read_json(self.artifact_store, os.path.join(self.uri, "splits.json"))
        ds = _read_lamp(self.artifact_store, self.uri, manifest["task"])
        spec = get_task(ds.task).adapted_to(q.input for q in ds.queries)
        splits = make_splits(ds, spec, len(manifest["stage2_users"]))
        data = PreparedData(task=spec, splits=splits, n_users=manifest["n_users"], n_records=manifest["n_records"])
        if split_manifest(data) != manifest:
            raise ValueError(
                f"{self.uri}: rebuilt splits differ from the stored manifest (tapper.data.make_splits changed?)"
            )
        data.dataset = ds  # type: ignore[attr-defined]
        return data

    def extract_metadata(self, data: PreparedData) -> Dict[str, Any]:
        s = data.splits
        return {
            "task": data.task.name,
            "users": data.n_users,
            "records": data.n_records,
            "stage1_users": len(s.stage1_users),
            "stage2_users": len(s.stage2_users),
            "stage1_examples": len(s.stage1_train),
            "stage2_examples": len(s.stage2_train),
            "eval_queries": len(s.eval),
        }

    def save_visualizations(self, data: PreparedData) -> Dict[str, VisualizationType]:
        m = self.extract_metadata(data)
        text = (
            f"# Splits ({data.task.name})\n\n"
            "Paper Table 6: Stage 2 = the N most active users; evaluation = their queries.\n\n"
        )
        text += md_table(["quantity", "value"], [[k, v] for k, v in m.items()])
        path = os.path.join(self.uri, "splits.md")
        write_text(self.artifact_store, path, text)
        return {path: VisualizationType.MARKDOWN}


def _dataset_of(data: PreparedData) -> LampDataset:
    """The dataset the splits were made from. PreparedData keeps none, so steps.data attaches it as `.dataset`."""
    ds = getattr(data, "dataset", None)
    if ds is None:
        raise ValueError("PreparedData has no .dataset attached; build it with steps.data.prepare_from_dataset()")
    return ds
