"""The model bundle: one directory that holds everything needed to serve a trained TAP-PER model.

Layout (format version 1)::

    <bundle>/
      model.json       {"format": "tapper-bundle", "format_version": 1, "task": "LaMP_2N",
                        "input_template": null | "<the task's wording the data used>",
                        "version": "<model version, e.g. the ZenML model version>",
                        "backbone_hash": "<weights hash of stage1/>", "per_user_params": ..,
                        "users": <rows in the table>, "created_at": "<UTC ISO time>", "source": {...}}
      stage1/          the merged Stage-1 backbone, a Hugging Face directory (config, safetensors, tokenizer)
      tapper/          TapPer.save(): prefix.safetensors + tapper_config.json
      histories.jsonl  optional: one line per user, {"user": id, "records": [LaMP profile items {id, date?,
                       <task fields>}]}, the histories the server starts from (the Stage-2 users' records);
                       feedback adds to them. Bundles written before JSON lines hold histories.json
                       ({user_id: [items]}), which still loads (tapper.data.history_file, deploy.histories).

A bundle is immutable once written: `export_bundle` builds it in a sibling temporary directory and renames it
into place, so a reader never sees half a bundle. Online updates never write into a bundle; the server keeps
its live state (updated user table + history store) in a separate state directory (deploy.service).

The format lives in the core because both sides use it: the workflow's promotion step writes bundles, the
server (deploy/) reads them; deploy.bundle adds what only the server needs (the lazy history store, MLflow
`models:/` resolution).

The promotion step calls `export_bundle(stage1_dir, state_dir, task_name, <root>/<version>, version=...)` and then
`publish_bundle(<root>/<version>, <root>/current)` (an atomic symlink swap) for servers reading `<root>/current`.
`deploy.bundle.bundle_from_mlflow("models:/<name>@production", out_dir)` builds the same bundle from the MLflow
registry (the pyfunc model the registration step logs: artifacts tapper_state/, backbone.json, stage1_backbone/).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from tapper.atomic import atomic_write_json
from tapper.data import get_task
from tapper.data.chronology import sort_chronologically
from tapper.data.history_file import HISTORIES_FILE, histories_file, write_histories
from tapper.data.types import Record

FORMAT = "tapper-bundle"
FORMAT_VERSION = 1
META_FILE = "model.json"
STAGE1_DIR = "stage1"
STATE_DIR = "tapper"
STATE_FILES = ("prefix.safetensors", "tapper_config.json")


class BundleError(ValueError):
    """A bundle (or what it is built from) is missing a part or is inconsistent. Names the path."""


@dataclass
class BundleInfo:
    path: Path
    task: str
    version: str
    backbone_hash: str
    input_template: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def stage1_dir(self) -> Path:
        return self.path / STAGE1_DIR

    @property
    def state_dir(self) -> Path:
        return self.path / STATE_DIR

    @property
    def histories_file(self) -> Path:
        return histories_file(self.path)

    def task_spec(self):
        """The TaskSpec, with the input wording the training data used (e.g. MovieLens-built LaMP_3)."""
        spec = get_task(self.task)
        if self.input_template and self.input_template != spec.input_template:
            if self.input_template not in spec.alternative_templates:
                raise BundleError(f"{self.path / META_FILE}: input_template is not a known wording of {self.task}")
            others = tuple(t for t in (spec.input_template, *spec.alternative_templates) if t != self.input_template)
            spec = replace(spec, input_template=self.input_template, alternative_templates=others)
        return spec


# --- export ----------------------------------------------------------------------------------------


def export_bundle(
    stage1_dir: str | os.PathLike,
    state_dir: str | os.PathLike,
    task_name: str,
    out_dir: str | os.PathLike,
    *,
    version: str | None = None,
    histories: Mapping[str, Sequence[Record]] | None = None,
    input_template: str | None = None,
    source: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> BundleInfo:
    """Write a serving bundle at `out_dir` from a merged Stage-1 backbone dir and a TapPer state dir.

    `version` names the model version (default: the state's backbone hash prefix); `histories` are the users'
    known records (e.g. the Stage-2 users' histories) the server starts from; `source` is free metadata
    (ZenML model/version, MLflow run) recorded in model.json. The bundle is written to a temporary sibling and
    renamed into place; an existing `out_dir` is an error unless `overwrite`.
    """
    stage1_dir, state_dir, out_dir = Path(stage1_dir), Path(state_dir), Path(out_dir)
    spec = get_task(task_name)  # unknown task names fail here, before anything is copied
    if not (stage1_dir / "config.json").is_file():
        raise BundleError(f"{stage1_dir}: not a Hugging Face model directory (no config.json)")
    for name in STATE_FILES:
        if not (state_dir / name).is_file():
            raise BundleError(f"{state_dir}: not a TapPer state directory (no {name})")
    if input_template and input_template != spec.input_template and input_template not in spec.alternative_templates:
        raise BundleError(f"input_template is not a known wording of {spec.name}")
    if out_dir.exists() and not overwrite:
        raise BundleError(f"{out_dir} exists (pass overwrite=True to replace it)")
    state_meta = json.loads((state_dir / "tapper_config.json").read_text())
    backbone_hash = state_meta.get("backbone_hash", "")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "task": spec.name,
        "input_template": input_template if input_template and input_template != spec.input_template else None,
        "version": str(version) if version is not None else (backbone_hash[:12] or "unversioned"),
        "backbone_hash": backbone_hash,
        "users": len(state_meta.get("user_ids", [])),
        "prefix_len": state_meta.get("stage2", {}).get("prefix_len"),
        "d": state_meta.get("d"),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": dict(source or {}),
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        shutil.copytree(stage1_dir, tmp / STAGE1_DIR)
        (tmp / STATE_DIR).mkdir()
        for name in STATE_FILES:
            shutil.copy2(state_dir / name, tmp / STATE_DIR / name)
        if histories:
            # Stored in time order, as feedback keeps them, so a server can use them as read.
            ordered = {u: sort_chronologically(list(recs)) for u, recs in histories.items()}
            write_histories(tmp / HISTORIES_FILE, ordered)
        atomic_write_json(tmp / META_FILE, meta)  # last: a bundle with model.json is complete
        # Readable by the serving processes, which may run as another user than the exporter (k8s: the pipeline
        # pod as root, the server as uid 10001): copytree keeps the 0700 of a temporary source directory.
        for p in [tmp, *tmp.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else p.stat().st_mode | 0o444)
        if out_dir.exists():
            old = out_dir.with_name(out_dir.name + f".old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return read_bundle(out_dir)


def publish_bundle(bundle_dir: str | os.PathLike, link: str | os.PathLike) -> Path:
    """Point `link` (e.g. /models/bundles/current) at `bundle_dir` atomically: a new symlink, renamed over the old.

    Servers reading TAPPER_MODEL_DIR=<link> load it on POST /reload or restart. The target is stored relative
    to the link's directory when it lies under it, so the volume can be mounted anywhere.
    """
    bundle_dir, link = Path(bundle_dir), Path(link)
    read_bundle(bundle_dir)  # never publish something that is not a complete bundle
    if link.exists() and not link.is_symlink():
        raise BundleError(f"{link} exists and is not a symlink; refusing to replace it")
    target = os.path.relpath(bundle_dir.resolve(), link.parent.resolve())
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    if tmp.is_symlink():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)
    return link


def read_bundle(path: str | os.PathLike) -> BundleInfo:
    """Check a bundle's layout and read model.json (no model is loaded)."""
    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise BundleError(
            f"{path}: not a tapper bundle (no {META_FILE}); expected {META_FILE}, {STAGE1_DIR}/, {STATE_DIR}/"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as err:
        raise BundleError(f"{meta_file}: not valid JSON: {err}") from None
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{meta_file}: format {meta.get('format')!r} v{meta.get('format_version')!r}, "
            f"this server reads {FORMAT!r} v{FORMAT_VERSION}"
        )
    for key in ("task", "version"):
        if not isinstance(meta.get(key), str) or not meta[key]:
            raise BundleError(f"{meta_file}: field {key!r} missing or not a string")
    if not (path / STAGE1_DIR / "config.json").is_file():
        raise BundleError(f"{path / STAGE1_DIR}: missing or not a Hugging Face model directory")
    for name in STATE_FILES:
        if not (path / STATE_DIR / name).is_file():
            raise BundleError(f"{path / STATE_DIR}: missing {name}")
    info = BundleInfo(
        path=path,
        task=meta["task"],
        version=meta["version"],
        backbone_hash=meta.get("backbone_hash", ""),
        input_template=meta.get("input_template"),
        meta=meta,
    )
    info.task_spec()  # unknown task / wording fails here
    return info
