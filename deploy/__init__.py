"""Serving a promoted TAP-PER model (deploy/README.md has the map of modules).

    deploy.bundle    the model bundle a promotion exports (and MLflow `models:/...@production` resolution)
    deploy.service   the model holder: batched predictions, feedback (Online-Emb) off the prediction path,
                     per-user privacy, persisted live state shared by replicas
    deploy.app       the FastAPI application (/predict, /v1/completions, /feedback, /users/{id}, /info, /reload,
                     /health, /metrics), failing closed without tokens
    deploy.serve     `tapper serve --model-dir DIR` (also `python -m deploy.serve`)

Nothing here imports ZenML; MLflow is imported only when a `models:/` URI is asked for.
"""
