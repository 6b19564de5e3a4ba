"""Where tapper keeps reusable state (converted backbones, embedding vectors)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$TAPPER_CACHE`, else `~/.cache/tapper`. Content-addressed, so sharing it is safe."""
    root = Path(os.environ.get("TAPPER_CACHE") or Path.home() / ".cache" / "tapper")
    root.mkdir(parents=True, exist_ok=True)
    return root


def project_root() -> Path:
    """The checkout a workflow runs in: `$TAPPER_HOME`, else the current directory (run state lives in .tapper/)."""
    return Path(os.environ.get("TAPPER_HOME") or os.getcwd()).resolve()
