"""One embedding cache per run, shared by every variant that reads the same backbone directory.

Each variant of an experiment loads the merged backbone afresh, and used to open its own EmbeddingCache: hash
the embedding matrix (an fp32 copy of it, 2 GB for an 8B model), hash the tokenizer and read every stored
vector from disk, twice per variant (training, then evaluation). Inside `one_cache_per_run()` the first cache
opened for a backbone directory is kept and handed to every later request for the same one; outside it each
call opens a fresh cache, as before.

The key is what the cache's vectors depend on, found without reading the weights again: the directory's
weights hash (tapper.model.backbone.weights_hash, memoized per file), the dtype the embedding was loaded in
(a bf16 backbone's vectors are those of its bf16-rounded embedding, cached apart from the fp32 ones), the
tokenizer and the cache root.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Iterator

from tapper.model.backbone import Backbone, tokenizer_hash
from tapper.model.embedding_cache import EmbeddingCache

_CACHES: ContextVar[dict | None] = ContextVar("tapper_run_embedding_caches", default=None)


@contextmanager
def one_cache_per_run(caches: dict | None = None) -> Iterator[dict]:
    """Within the block, `shared_embedding_cache` returns one cache per backbone, kept in `caches` (yielded; pass
    the same dict again to go on sharing across blocks)."""
    caches = {} if caches is None else caches
    token = _CACHES.set(caches)
    try:
        yield caches
    finally:
        _CACHES.reset(token)


def shared_embedding_cache(root: str | Path, backbone: Backbone) -> EmbeddingCache:
    caches = _CACHES.get()
    if caches is None:
        return EmbeddingCache(root, backbone.model, backbone.tokenizer)
    dtype = backbone.model.get_input_embeddings().weight.dtype
    key = (str(Path(root).resolve()), backbone.weights_hash, str(dtype), tokenizer_hash(backbone.tokenizer))
    if key not in caches:
        caches[key] = EmbeddingCache(root, backbone.model, backbone.tokenizer)
    return caches[key]


def cache_for(backbone: Backbone, root: str | Path | None = None) -> EmbeddingCache:
    """The embedding cache every method reads `backbone`'s record and query vectors from: under tapper's cache
    directory unless `root` is given, the run's one cache inside `one_cache_per_run()`."""
    from tapper.paths import cache_dir

    return shared_embedding_cache(root or cache_dir() / "embeddings", backbone)
