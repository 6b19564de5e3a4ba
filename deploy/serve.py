"""`tapper serve` and `tapper bundle`: serve a model bundle over HTTP, or build one.

    TAPPER_API_TOKEN=... TAPPER_ADMIN_TOKEN=... tapper serve --model-dir DIR [--state-dir DIR] [--host 0.0.0.0] \
        [--port 8080]
    tapper serve --model-dir DIR --insecure-local                                 # no tokens, loopback only
    tapper serve --model-uri models:/tapper-LaMP_2N@production --model-dir DIR   # fetch from MLflow first
    tapper bundle --stage1 DIR --state DIR --task LaMP_2N --out DIR [--version V]
    python -m deploy.serve ...                                                    # the same, without the tapper CLI

Settings also come from the environment (TAPPER_MODEL_DIR, TAPPER_STATE_DIR, TAPPER_FEEDBACK_EPOCHS,
TAPPER_FEEDBACK_STEPS, TAPPER_FEEDBACK_LR, TAPPER_MAX_NEW_TOKENS, TAPPER_VERIFY_BACKBONE, TAPPER_TORCH_THREADS,
TAPPER_SCRATCH_DIR, TAPPER_API_TOKEN, TAPPER_ADMIN_TOKEN, TAPPER_INSECURE_LOCAL, TAPPER_MODE, TAPPER_MAX_BATCH...;
deploy/README.md lists them); flags win over the environment. Without tokens the server refuses to start
(deploy.auth), unless --insecure-local, which binds to loopback only.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model bundle over HTTP (FastAPI: /predict /v1/completions /feedback /users/{id} /info /reload "
        "/health /metrics; needs TAPPER_API_TOKEN and TAPPER_ADMIN_TOKEN, or --insecure-local)",
        description="Serve a TAP-PER model bundle (deploy/bundle.py layout: model.json, stage1/, tapper/). "
        "Feedback state (updated user rows, history store) is written to --state-dir.",
    )
    p.add_argument(
        "--model-dir", default=os.environ.get("TAPPER_MODEL_DIR"), help="bundle directory (env TAPPER_MODEL_DIR)"
    )
    p.add_argument(
        "--model-uri",
        default=os.environ.get("TAPPER_MODEL_URI"),
        help="MLflow model URI, e.g. models:/tapper-LaMP_2N@production: downloaded into --model-dir as a bundle "
        "first when --model-dir holds no bundle (env TAPPER_MODEL_URI)",
    )
    p.add_argument(
        "--state-dir", default=None, help="writable live-state directory (env TAPPER_STATE_DIR; default MODEL_DIR/live)"
    )
    p.add_argument(
        "--host", default=os.environ.get("TAPPER_HOST", "127.0.0.1"), help="bind address (default: %(default)s)"
    )
    p.add_argument(
        "--port", type=int, default=int(os.environ.get("TAPPER_PORT", 8080)), help="port (default: %(default)s)"
    )
    p.add_argument(
        "--feedback-epochs", type=float, default=None, help="Online-Emb epochs over a feedback's examples (default 1)"
    )
    p.add_argument("--feedback-steps", type=int, default=None, help="or exactly this many optimizer steps per feedback")
    p.add_argument(
        "--feedback-lr", type=float, default=None, help="Online-Emb learning rate (default: the model's Stage-2 lr)"
    )
    p.add_argument(
        "--compact-every",
        type=int,
        default=None,
        help="write the whole live state as a snapshot after this many feedback deltas "
        "(env TAPPER_COMPACT_EVERY; default 1000)",
    )
    p.add_argument(
        "--scratch-dir",
        default=None,
        help="opt-in: keep per-user state in unlinked scratch files in this directory on a LOCAL disk, not in "
        "anonymous memory: the user table in a file-backed mapping (page cache: only rows in use resident, "
        "evictable) and the history stores' unread users' lines in spool files; created if missing "
        "(env TAPPER_SCRATCH_DIR; default: in memory)",
    )
    p.add_argument(
        "--no-verify-backbone", action="store_true", help="skip hashing stage1/ against the state's backbone hash"
    )
    p.add_argument(
        "--insecure-local",
        action="store_true",
        default=None,
        help="serve WITHOUT tokens, on a loopback address only (development; env TAPPER_INSECURE_LOCAL=1). "
        "Otherwise TAPPER_API_TOKEN and TAPPER_ADMIN_TOKEN must be set, or the server does not start",
    )
    p.add_argument(
        "--mode",
        choices=["tapper", "base", "rag"],
        default=None,
        help="what answers predictions: the TAP-PER prefix (default), the bare Stage-1 backbone, or the "
        "backbone with the user's --rag-k retrieved records in the prompt (A/B baselines; env TAPPER_MODE)",
    )
    p.add_argument(
        "--rag-k", type=int, default=None, help="records retrieved into the prompt with --mode rag (default 4)"
    )
    p.add_argument(
        "--max-batch", type=int, default=None, help="predictions per forward pass (env TAPPER_MAX_BATCH; default 8)"
    )
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=None,
        help="how long a batch waits for more predictions (env TAPPER_BATCH_WAIT_MS; default 5)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=None,
        help="predictions that may wait; beyond it 503 + Retry-After (env TAPPER_MAX_QUEUE; default 64)",
    )
    p.add_argument("--log-level", default=os.environ.get("TAPPER_LOG_LEVEL", "info"))
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "bundle",
        help="write a serving bundle from a Stage-1 backbone dir and a TapPer state dir",
        description="Write a serving bundle (model.json, stage1/, tapper/, histories.jsonl) at --out, atomically. "
        "Or, with --model-uri, from the MLflow registry.",
    )
    p.add_argument("--stage1", help="merged Stage-1 backbone directory (Hugging Face format)")
    p.add_argument("--state", help="TapPer state directory (prefix.safetensors + tapper_config.json)")
    p.add_argument("--task", help="LaMP task name, e.g. LaMP_2N")
    p.add_argument("--model-uri", help="instead: an MLflow model URI such as models:/tapper-LaMP_2N@production")
    p.add_argument("--version", help="model version recorded in model.json")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    p.set_defaults(func=cmd_bundle)


def cmd_bundle(args: argparse.Namespace) -> int:
    from deploy.bundle import bundle_from_mlflow, export_bundle

    if args.model_uri:
        info = bundle_from_mlflow(args.model_uri, args.out, overwrite=args.overwrite)
    else:
        missing = [f"--{n}" for n in ("stage1", "state", "task") if not getattr(args, n)]
        if missing:
            raise ValueError(f"tapper bundle needs {', '.join(missing)} (or --model-uri)")
        info = export_bundle(
            args.stage1, args.state, args.task, args.out, version=args.version, overwrite=args.overwrite
        )
    print(f"wrote bundle {info.path} (task {info.task}, version {info.version})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from deploy.config import ServeConfig

    if not args.model_dir:
        raise ValueError("no model bundle: pass --model-dir DIR or set TAPPER_MODEL_DIR")
    cfg = ServeConfig.from_env(
        model_dir=args.model_dir,
        state_dir=args.state_dir,
        feedback_epochs=args.feedback_epochs,
        feedback_steps=args.feedback_steps,
        feedback_lr=args.feedback_lr,
        compact_every=args.compact_every,
        scratch_dir=args.scratch_dir,
        mode=args.mode,
        rag_k=args.rag_k,
        auth={"insecure_local": args.insecure_local},
        batching={"max_batch": args.max_batch, "max_wait_ms": args.batch_wait_ms, "max_queue": args.max_queue},
        **({"verify_backbone": False} if args.no_verify_backbone else {}),
    )
    # Fail closed before anything is loaded or downloaded: no tokens (and no --insecure-local on loopback), no server.
    cfg.auth.check_startable(args.host)

    import torch
    import uvicorn

    from deploy.app import create_app
    from deploy.bundle import META_FILE, bundle_from_mlflow

    if args.model_uri and not (Path(args.model_dir) / META_FILE).exists():
        bundle_from_mlflow(args.model_uri, args.model_dir)
    threads = os.environ.get("TAPPER_TORCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One process per replica: the model lives in memory; scale with replicas (they share --state-dir safely).
    uvicorn.run(
        create_app(cfg, host=args.host), host=args.host, port=args.port, log_level=args.log_level.lower(), workers=1
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m deploy.serve serve ...` is `tapper serve ...`: one entry point, one error policy."""
    from tapper.cli import main as tapper_main

    return tapper_main(argv)


if __name__ == "__main__":
    sys.exit(main())
