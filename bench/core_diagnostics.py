"""Diagnostics of a finished `tapper experiment` run: where a user's signal is lost (tapper.analysis.signal).

    python bench/core_diagnostics.py RUN_DIR [--variants tap-per,pq-only] [--train-sample 200] [--out JSON]

RUN_DIR is an experiment's --out directory (metrics.json, stage1/, tapper/<variant>/). The same split is
rebuilt from the files and settings metrics.json records. For each saved TAP-PER variant: accuracy on a
sample of its own Stage-2 training examples against the held-out queries, attention concentration, and the
sizes of the prefix parts; once per run: how alike queries' z_q and users' pooled histories are. Writes
JSON (default RUN_DIR/diagnostics.json) and prints it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def diagnose(run_dir: Path, variants: list[str] | None, train_n: int) -> dict:
    from tapper.analysis.signal import attention_report, input_report, train_sample
    from tapper.config import load_run_config
    from tapper.eval.predict import generate_texts
    from tapper.experiment import embedding_cache, prepare_data, score
    from tapper.model.backbone import load_backbone_dir
    from tapper.model.tapper import CONFIG_FILE, TapPer
    from tapper.train.stage2 import encoder_for, limit_per_user

    metrics = json.loads((run_dir / "metrics.json").read_text())
    cfg = load_run_config(metrics["config"])
    data = prepare_data(metrics["task"], metrics["files"]["questions"], metrics["files"]["outputs"], cfg.stage2_users)
    # Record vectors from a backbone no state is loaded onto (a loaded state brings its bridge LoRA), as in training.
    cache = embedding_cache(load_backbone_dir(run_dir / "stage1"))
    out: dict = {
        "run": str(run_dir),
        "inputs": input_report(data.task, cache, data.splits.eval, seed=cfg.seed),
        "variants": {},
    }
    saved = sorted(p.name for p in (run_dir / "tapper").iterdir() if (p / CONFIG_FILE).exists())
    for name in variants or saved:
        bb = load_backbone_dir(run_dir / "stage1")
        model = TapPer.load(run_dir / "tapper" / name, bb.model)
        model.eval()
        train = train_sample(
            limit_per_user(data.splits.stage2_train, model.cfg.max_examples_per_user), train_n, cfg.seed
        )
        rows = model.user_rows if model.cfg.use_pu else None
        enc = encoder_for(model, data.task, bb.tokenizer, cache)
        train_enc = enc.encode(train, rows, progress=False)
        eval_enc = enc.encode(data.splits.eval, rows, progress=False)
        train_preds = generate_texts(model, train_enc, bb.tokenizer, data.task, cfg.eval.batch_size, None, False)
        out["variants"][name] = {
            "train_accuracy": round(score(data, train_preds, train)["accuracy"], 4),
            "train_examples": len(train),
            "eval_accuracy": round(metrics["variants"][name]["accuracy"], 4),
            "eval_queries": len(data.splits.eval),
            "lambda_t": round(float(model.prefix.lambda_t), 4),
            "lambda_o": round(float(model.prefix.lambda_o), 4),
            **attention_report(model, eval_enc),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--variants", help="comma-separated saved variants (default: every one under RUN_DIR/tapper)")
    ap.add_argument("--train-sample", type=int, default=200, help="training examples scored per variant")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    report = diagnose(args.run_dir, args.variants.split(",") if args.variants else None, args.train_sample)
    from tapper.atomic import atomic_write_json

    atomic_write_json(args.out or args.run_dir / "diagnostics.json", report)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
