"""Small helpers the materializers share: JSON, directory copies, markdown/HTML tables."""

from __future__ import annotations

import html
import json
import os
from typing import Any

from zenml.artifact_stores import BaseArtifactStore
from zenml.artifact_stores.local_artifact_store import LocalArtifactStore


def write_json(store: BaseArtifactStore, path: str, obj: Any) -> None:
    with store.open(path, "w") as f:
        f.write(json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=False))


def read_json(store: BaseArtifactStore, path: str) -> Any:
    with store.open(path, "r") as f:
        return json.loads(f.read())


def write_text(store: BaseArtifactStore, path: str, text: str) -> None:
    with store.open(path, "w") as f:
        f.write(text)


def upload_file(store: BaseArtifactStore, local: str, dest: str) -> None:
    """Local file -> artifact store (stores check that paths stay in their bounds, so no copyfile)."""
    import shutil

    with open(local, "rb") as src, store.open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)


def download_file(store: BaseArtifactStore, src: str, local: str) -> None:
    import shutil

    with store.open(src, "rb") as s, open(local, "wb") as d:
        shutil.copyfileobj(s, d, 1 << 22)


def upload_dir(store: BaseArtifactStore, local_dir: str, dest: str) -> None:
    """Copy a local directory tree into the artifact store."""
    for root, _dirs, files in os.walk(local_dir):
        rel = os.path.relpath(root, local_dir)
        target = dest if rel == "." else os.path.join(dest, rel)
        store.makedirs(target)
        for name in files:
            upload_file(store, os.path.join(root, name), os.path.join(target, name))


def download_dir(store: BaseArtifactStore, src: str, local_dir: str) -> None:
    os.makedirs(local_dir, exist_ok=True)
    for name in store.listdir(src):
        name = name.decode() if isinstance(name, bytes) else str(name)
        s = os.path.join(src, name)
        d = os.path.join(local_dir, name)
        if store.isdir(s):
            download_dir(store, s, d)
        else:
            download_file(store, s, d)


def is_local(store: BaseArtifactStore) -> bool:
    return isinstance(store, LocalArtifactStore)


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def html_table(header: list[str], rows: list[list[Any]], highlight_row: int | None = None) -> str:
    def cell(v: Any) -> str:
        return html.escape(f"{v:.4f}" if isinstance(v, float) else str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for i, r in enumerate(rows):
        style = ' style="font-weight:bold;background:#eef6ee"' if i == highlight_row else ""
        body.append(f"<tr{style}>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>")
    return (
        '<table style="border-collapse:collapse;font-family:sans-serif" border="1" cellpadding="4">'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    )
