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
# ZenML reads its config/store location once, at first import: isolate it for the whole
# session before any test module can import zenml (test modules may isolate further).
_zen = tempfile.mkdtemp(prefix="tapper-test-zenml-")
os.environ["ZENML_CONFIG_PATH"] = os.path.join(_zen, "config")
os.environ["ZENML_LOCAL_STORES_PATH"] = os.path.join(_zen, "stores")
os.environ.setdefault("TAPPER_HOME", os.path.join(_zen, "project"))
os.makedirs(os.environ["TAPPER_HOME"], exist_ok=True)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


# The tiny backbone and embedding cache most model tests build from their module's own `data` fixture
# (train, evals, users); a module that needs another corpus defines its own `backbone`.
import pytest  # noqa: E402  (after the environment above is set)


@pytest.fixture(scope="module")
def backbone(data):
    from model_fixtures import corpus
    from tapper.model.backbone import load_backbone

    train, evals, _ = data
    return load_backbone("tiny", texts=corpus(train, evals))


@pytest.fixture(scope="module")
def cache(backbone, tmp_path_factory):
    from tapper.model.embedding_cache import EmbeddingCache

    return EmbeddingCache(tmp_path_factory.mktemp("cache"), backbone.model, backbone.tokenizer)
