"""Data steps: read the files, check them (Great Expectations), split them (paper Table 6)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Optional, Tuple

from zenml import log_metadata, save_artifact, step
from zenml.logger import get_logger
from zenml.types import HTMLString

from materializers.types import LampFiles
from tapper.data.types import LampDataset
from tapper.data.prepared import PreparedData

logger = get_logger(__name__)


class DataValidationError(RuntimeError):
    """The input files failed the data-quality suite; the message says what failed."""


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@step
def load_data(
    questions: str,
    outputs: str,
    task: Optional[str] = None,
    questions_sha256: str = "",
    outputs_sha256: str = "",
) -> Annotated[LampFiles, "lamp_files"]:
    """Read both files as bytes. The sha256 parameters key the step cache on file content, not path."""
    qb, ob = Path(questions).read_bytes(), Path(outputs).read_bytes()
    files = LampFiles(
        questions_name=str(questions),
        outputs_name=str(outputs),
        questions_bytes=qb,
        outputs_bytes=ob,
        questions_sha256=hashlib.sha256(qb).hexdigest(),
        outputs_sha256=hashlib.sha256(ob).hexdigest(),
        task=task,
    )
    for given, actual, name in (
        (questions_sha256, files.questions_sha256, questions),
        (outputs_sha256, files.outputs_sha256, outputs),
    ):
        if given and given != actual:
            raise RuntimeError(f"{name} changed between pipeline compilation and the load step; run again")
    return files


@step
def validate_data(
    files: LampFiles,
    min_history: int = 1,
    max_history: int = 100_000,
) -> Tuple[Annotated[LampDataset, "lamp_dataset"], Annotated[HTMLString, "data_quality_report"]]:
    """Run the task's expectation suite; on failure save the report anyway and stop the run here."""
    from data_quality import validate_files
    from tapper.data import load_lamp

    result = validate_files(files, min_history, max_history)
    meta = {**result.summary, "verdict": "passed" if result.success else "failed", "failures": result.failures[:50]}
    if not result.success:
        # The step's outputs are never written when it fails, so the report is saved by hand:
        # it is linked to this (failed) step run and shows in the dashboard.
        save_artifact(
            HTMLString(result.html), name="data_quality_report", user_metadata=meta, tags=["data-quality", "failed"]
        )
        try:
            log_metadata(metadata={"data_quality": meta})
        except Exception:  # noqa: BLE001 - metadata is best-effort; the error below is what matters
            pass
        raise DataValidationError(result.message())
    # The suite passed; the core loader parses and applies tapper's own invariants on top.
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tapper-load-") as tmp:
        q, o = Path(tmp) / "questions.json", Path(tmp) / "outputs.json"
        q.write_bytes(files.questions_bytes)
        o.write_bytes(files.outputs_bytes)
        try:
            ds = load_lamp(q, o, result.task)
            ds.source = files.questions_name
        except ValueError as err:
            msg = str(err).replace(str(q), files.questions_name).replace(str(o), files.outputs_name)
            save_artifact(
                HTMLString(result.html),
                name="data_quality_report",
                user_metadata={**meta, "verdict": "failed", "failures": [msg]},
            )
            raise DataValidationError(f"data validation failed for {result.task}: {msg}") from None
    log_metadata(metadata=meta, artifact_name="data_quality_report", infer_artifact=True)
    log_metadata(metadata={"data_quality": {"verdict": "passed", "expectations": result.summary["expectations"]}})
    return ds, HTMLString(result.html)


def prepare_from_dataset(ds: LampDataset, stage2_users: int) -> PreparedData:
    """tapper.experiment.prepare_data, from an already loaded and validated dataset."""
    from tapper.data import get_task, make_splits

    spec = get_task(ds.task).adapted_to(q.input for q in ds.queries)
    n_users = len(ds.users())
    if stage2_users > n_users:
        raise ValueError(f"stage2_users={stage2_users} but the dataset has only {n_users} users")
    splits = make_splits(ds, spec, stage2_users)
    data = PreparedData(task=spec, splits=splits, n_users=n_users, n_records=sum(len(q.profile) for q in ds.queries))
    data.dataset = ds  # type: ignore[attr-defined]  # the splits materializer stores it
    return data


@step
def build_splits(dataset: LampDataset, stage2_users: int) -> Annotated[PreparedData, "prepared_data"]:
    data = prepare_from_dataset(dataset, stage2_users)
    s = data.splits
    logger.info(
        "splits: %d Stage-1 users (%d examples), %d Stage-2 users (%d examples), %d evaluation queries",
        len(s.stage1_users),
        len(s.stage1_train),
        len(s.stage2_users),
        len(s.stage2_train),
        len(s.eval),
    )
    return data
