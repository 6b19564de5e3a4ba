"""Serving a promoted TAP-PER model.

    deploy.bundle    the model bundle a promotion exports (and MLflow `models:/...@production` resolution)
    deploy.service   the model holder: predict, feedback (Online-Emb), reload, persisted live state
    deploy.app       the FastAPI application (/health, /info, /predict, /feedback, /reload)
    deploy.serve     `tapper serve --model-dir DIR` (also `python -m deploy.serve`)

Nothing here imports ZenML; MLflow is imported only when a `models:/` URI is asked for.
"""
