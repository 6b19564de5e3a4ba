"""`tapper online`: the streaming-feedback simulation directly on LaMP files.

    tapper online --task LaMP_2N --questions Q.json --outputs O.json --backbone tiny --out DIR \
        [--stage2-users N] [--config run.yaml] [--set online.chunks=5] [--set stage2.epochs=6]

Writes DIR/trajectories.json and DIR/online.png (plus DIR/stage1/ and DIR/bootstrap/).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from tapper.cli_args import add_backbone_arg, add_data_args, add_set_arg

    p = subparsers.add_parser(
        "online",
        help="simulate streaming feedback: Static, Online-Emb, Online-Full, Full-Retrain (paper 4.6)",
        description="Split each evaluation user's history in half, bootstrap Stage 2 on the earlier half, "
        "feed the later "
        "half in T chunks and score every method on the unchanged test queries after each chunk. "
        "Writes DIR/trajectories.json and DIR/online.png.",
    )
    add_data_args(p)
    add_backbone_arg(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--stage2-users",
        type=int,
        default=None,
        help="N most active users: bootstrapped, streamed and evaluated (default 100)",
    )
    p.add_argument(
        "--config",
        help="YAML with run settings (stage1/stage2/eval/stage2_users/seed) and an `online:` section "
        "(chunks, epochs, steps, lr_emb, lr_full, lambda_lr, batch_size, methods, eval_history, seed)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_set_arg(p)
    p.set_defaults(func=cmd_online)
    return p


def cmd_online(args: argparse.Namespace) -> int:
    from tapper.online.config import load_online_config
    from tapper.online.simulate import run_online

    base = {}
    if args.config:
        import yaml

        base = yaml.safe_load(Path(args.config).read_text()) or {}
    if args.stage2_users is not None:
        base["stage2_users"] = args.stage2_users
    cfg, ocfg = load_online_config(base, args.overrides)
    report = run_online(
        args.task,
        args.questions,
        args.outputs,
        args.backbone,
        args.out,
        cfg,
        ocfg,
        progress=not args.no_progress,
        on_step=print_step,
    )
    print_trajectories(report)
    print(f"wrote {Path(args.out) / 'trajectories.json'} and {Path(args.out) / 'online.png'}")
    return 0


def print_step(method: str, t: int, fraction: float, metrics: dict) -> None:
    # One line per method and chunk, also under --no-progress: a whole simulation runs for
    # tens of minutes, and without this it would print nothing until the end.
    import sys

    scores = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
    print(f"[online] {method} t={t} ({100 * fraction:.0f}% of history absorbed): {scores}", file=sys.stderr, flush=True)


def print_trajectories(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report.get('task', '')} online adaptation: {report['metric']} by history absorbed")
    table.add_column("method", no_wrap=True)
    for f in report["fractions"]:
        table.add_column(f"{100 * f:.0f}%", justify="right")
    table.add_column("params/chunk", justify="right")
    table.add_column("s/chunk", justify="right")
    for m, ys in report["methods"].items():
        c = report["cost"][m]
        table.add_row(
            m, *(f"{y:.4f}" for y in ys), f"{c['params_touched_per_chunk']:,}", f"{c['seconds_per_chunk']:.2f}"
        )
    import shutil

    console = Console(width=max(shutil.get_terminal_size((120, 24)).columns, 120))
    console.print(table)
    if "final_gap_full_retrain_minus_online_full" in report:
        console.print(
            f"final gap Full-Retrain - Online-Full: {report['final_gap_full_retrain_minus_online_full']:+.4f}"
        )
    if report.get("final_paired"):
        from tapper.eval.paired import describe

        console.print(f"at 100 %, paired on the same queries ({report['metric']}), mean [95 % bootstrap interval]:")
        for pair, st in report["final_paired"].items():
            console.print(f"  {pair}: {describe(st, 4)}")
