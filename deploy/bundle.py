"""The server's side of the model bundle (the format itself: tapper.bundle): the users' history store read lazily
(deploy.histories), and bundles built from the MLflow registry (`models:/<name>@production`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from deploy.histories import HistoryStore, read_histories_dir
from tapper.atomic import atomic_write_json
from tapper.bundle import (
    FORMAT,
    FORMAT_VERSION,
    META_FILE,
    STAGE1_DIR,
    STATE_DIR,
    STATE_FILES,
    BundleError,
    BundleInfo,
    export_bundle,
    publish_bundle,
    read_bundle,
)

# The format is the core's (tapper.bundle), re-exported for the server's modules; the rest is the server's own.
__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "META_FILE",
    "STAGE1_DIR",
    "STATE_DIR",
    "STATE_FILES",
    "BundleError",
    "BundleInfo",
    "export_bundle",
    "publish_bundle",
    "read_bundle",
    "read_histories",
    "bundle_from_mlflow_dir",
    "bundle_from_mlflow",
]


def read_histories(info: BundleInfo, spool_dir: str | os.PathLike | None = None) -> HistoryStore:
    """The bundle's history store (each user's records converted when first read; see deploy.histories).
    `spool_dir`: keep the unread users' lines in a scratch file there instead of memory (HistoryStore.read)."""
    return read_histories_dir(info.path, spool_dir)


# --- MLflow registry -------------------------------------------------------------------------------


def bundle_from_mlflow_dir(
    model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, version: str | None = None, overwrite: bool = False
) -> BundleInfo:
    """Bundle from a downloaded MLflow pyfunc model directory (the layout steps/register.py logs)."""
    import yaml

    model_dir = Path(model_dir)
    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        raise BundleError(f"{model_dir}: not an MLflow model directory (no MLmodel)")
    conf = yaml.safe_load(mlmodel.read_text()) or {}
    arts = (conf.get("flavors", {}).get("python_function", {}) or {}).get("artifacts", {}) or {}

    def art(name: str) -> Path | None:
        entry = arts.get(name)
        return model_dir / entry["path"] if entry else None

    state, ref_file = art("tapper_state"), art("backbone_ref")
    if state is None or ref_file is None:
        raise BundleError(
            f"{mlmodel}: not a tapper model (artifacts tapper_state and backbone_ref expected, got {sorted(arts)})"
        )
    ref = json.loads(ref_file.read_text())
    stage1 = art("stage1_backbone")
    if stage1 is None:
        uri = str(ref.get("uri", ""))
        if not uri or not Path(uri).is_dir():
            raise BundleError(
                f"{mlmodel}: the model was registered without its Stage-1 backbone (log_backbone=False) and the "
                f"backbone's artifact-store location {uri!r} is not a local directory here; register with "
                "log_backbone=True, or mount the artifact store, or export the bundle from the pipeline instead"
            )
        stage1 = Path(uri)
    meta = conf.get("metadata") or {}
    hist_file = art("histories")  # the Stage-2 users' histories, when the model was registered with them
    histories = HistoryStore.read(hist_file) if hist_file is not None and hist_file.is_file() else None
    return export_bundle(
        stage1,
        state,
        ref["task"],
        out_dir,
        version=version or meta.get("zenml_model_version"),
        histories=histories,
        source={"mlflow_model_dir": str(model_dir), **{k: str(v) for k, v in meta.items()}},
        overwrite=overwrite,
    )


def bundle_from_mlflow(model_uri: str, out_dir: str | os.PathLike, *, overwrite: bool = False) -> BundleInfo:
    """Download `models:/<name>@<alias>` (or any MLflow model URI) and write it as a bundle at `out_dir`.

    Uses the ambient MLflow configuration (MLFLOW_TRACKING_URI and credentials).
    """
    import mlflow

    version = None
    if model_uri.startswith("models:/") and "@" in model_uri:
        name, alias = model_uri[len("models:/") :].split("@", 1)
        mv = mlflow.MlflowClient().get_model_version_by_alias(name, alias)
        version = f"{name}/{mv.version}"
    with tempfile.TemporaryDirectory(prefix="tapper-mlflow-") as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp)
        info = bundle_from_mlflow_dir(local, out_dir, version=version, overwrite=overwrite)
    meta = dict(info.meta)
    meta["source"] = {**meta.get("source", {}), "mlflow_model_uri": model_uri}
    meta["source"].pop("mlflow_model_dir", None)
    atomic_write_json(info.path / META_FILE, meta)
    return read_bundle(info.path)
