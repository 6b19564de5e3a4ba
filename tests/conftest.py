"""Test-wide settings: offline, quiet, and a private cache so tests never share state with a user's."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Set before anything imports transformers / zenml / mlflow.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ZENML_ANALYTICS_OPT_IN", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("ZENML_AUTO_OPEN_DASHBOARD", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["TAPPER_CACHE"] = tempfile.mkdtemp(prefix="tapper-test-cache-")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
