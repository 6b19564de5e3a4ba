"""ZenML pipelines wiring tapper's steps into versioned DAGs (see pipelines/training.py)."""
