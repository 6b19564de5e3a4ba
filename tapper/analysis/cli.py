"""`tapper report` and `tapper attention`: the comparison report and the attention case study."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_report(args: argparse.Namespace) -> int:
    from tapper.analysis.report import write_report

    metrics = [load_named_metrics(m) for m in args.metrics]
    fp = json.loads(Path(args.footprint).read_text()) if args.footprint else None
    tm = json.loads(Path(args.timing).read_text()) if args.timing else None
    files = write_report(metrics if len(metrics) > 1 else metrics[0], args.out, footprint=fp, timing=tm)
    for f in files:
        print(f)
    return 0


def load_named_metrics(arg: str) -> dict:
    """`PATH` or `NAME=PATH`: a metrics.json, with NAME (if given) as its section's name in the report."""
    name, sep, path = arg.partition("=")
    if not sep or "/" in name or not name:
        name, path = "", arg
    from tapper.eval.metrics_file import read_metrics

    metrics = read_metrics(path).to_dict()  # a file of another shape fails here, naming the field
    if name:
        metrics["name"] = name
    return metrics


def cmd_attention(args: argparse.Namespace) -> int:
    from tapper.analysis.attention import case_study_from_run

    study, files = case_study_from_run(
        args.run, args.questions, args.outputs, args.task, args.variant, args.query, args.out
    )
    for name, summary in study.get("over_all_queries", {}).items():
        print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    for f in files:
        print(f)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "report",
        help="Markdown + PNG comparison report from metrics.json",
        description="Write DIR/report.md (Table-1-style comparison with the best per metric in bold, ablation and "
        "sensitivity tables, user groups) and its PNG plots from one or more metrics.json files.",
    )
    p.add_argument(
        "--metrics",
        required=True,
        action="append",
        help="metrics.json of a `tapper experiment` run, or NAME=metrics.json to name its section "
        "(repeat for several tasks; name them when two runs share a task)",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--footprint", help="footprint JSON from bench/footprint.py (adds the parameter-footprint section)")
    p.add_argument("--timing", help="timing JSON from bench/train_time.py (adds the per-user training-time section)")
    p.set_defaults(func=cmd_report)

    a = sub.add_parser(
        "attention",
        help="attention case study (heatmap) from a trained run",
        description="Which history records P_q's attention weighs for one query, with and without temporal bias; "
        "writes attention.png and attention.json.",
    )
    a.add_argument(
        "--run", required=True, help="output directory of `tapper experiment` (with stage1/ and tapper/<variant>/)"
    )
    a.add_argument("--questions", required=True, help="LaMP questions JSON the run used")
    a.add_argument("--outputs", required=True, help="LaMP outputs JSON the run used")
    a.add_argument("--task", help="LaMP task (default: the run's)")
    a.add_argument("--variant", default="tap-per", help="trained variant to inspect (default: %(default)s)")
    a.add_argument(
        "--query", help="query id (default: one where tap-per is right and lambda0 wrong, else the longest history)"
    )
    a.add_argument("--out", help="output directory (default: RUN/report)")
    a.set_defaults(func=cmd_attention)
