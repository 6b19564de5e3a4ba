"""`tapper` command line. Every subcommand has --help.

    tapper experiment   both stages + evaluation directly on LaMP files
    tapper online       streaming-feedback simulation (Static / Online-Emb / Online-Full / Full-Retrain)
    tapper build        LaMP-format datasets from real or synthetic data
    tapper plan         memory each stage needs on one GPU (meta-device modules), the largest micro-batch that fits
    (serve and bundle come from deploy/serve.py; the ZenML commands — train, promote, lineage, models, ui,
    stack — from pipelines/cli_commands.py; both through the `tapper.commands` entry points. ZenML is
    imported only when one of its commands runs.)

Errors are one line, `tapper: error: <what, where> ...`; `--debug` (anywhere on the line, or
TAPPER_DEBUG=1) shows the traceback instead. Nothing heavy is imported to build the parser, so
`tapper --help` answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

# Re-exported: the command modules and the tests reach the shared helpers through here too.
from tapper.cli_args import CLIError, add_backbone_arg, add_data_args, add_set_arg, one_line  # noqa: F401

DEFAULT_VARIANTS = "base,tap-per"
COMMANDS_GROUP = "tapper.commands"  # [project.entry-points."tapper.commands"] in pyproject.toml


def _quiet_env() -> None:
    # Offline by design: nothing is fetched from a hub at run time.
    from tapper.quiet import quiet

    quiet()


def cmd_experiment(args: argparse.Namespace) -> int:
    from tapper.config import load_run_config
    from tapper.experiment import load_user_groups, run_experiment

    from tapper.presets import preset_for

    # Without --config, the backbone's tested CPU preset (tapper.presets); with it, exactly that file.
    base, preset = preset_for(args.backbone) if not args.config else ({}, None)
    if args.config:
        import yaml

        base = yaml.safe_load(Path(args.config).read_text()) or {}
    if preset is not None and not args.no_progress:
        print(f"settings: {preset.name} (the {args.backbone} preset; --config FILE to replace it)", file=sys.stderr)
    if args.stage2_users is not None:
        base["stage2_users"] = args.stage2_users
    cfg = load_run_config(base, args.overrides)
    groups_file = args.user_groups or (Path(args.questions).parent / "users.json")
    groups = load_user_groups(groups_file) if Path(groups_file).exists() else None
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    report = run_experiment(
        args.task,
        args.questions,
        args.outputs,
        args.backbone,
        args.out,
        cfg,
        variants,
        user_groups=groups,
        progress=not args.no_progress,
    )
    print_report(report)
    print(f"wrote {Path(args.out) / 'metrics.json'} and {Path(args.out) / 'predictions'}/")
    return 0


class HelpConfig(argparse.Action):
    """`--help-config`: every `--set` key, its default and what it means (tapper.config's field help), then exit."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(config_help())
        parser.exit()


def config_help() -> str:
    import json

    from tapper.config import config_keys

    rows = [(key, json.dumps(default), meaning) for key, default, meaning in config_keys()]
    width = max(len(k) + len(d) for k, d, _ in rows) + 3
    lines = ["settings of `tapper experiment` (YAML under --config, or --set KEY=VALUE), with their defaults:", ""]
    lines += [f"  {k} = {d}".ljust(width + 2) + f"  {m}" for k, d, m in rows]
    lines += ["", "without --config, the backbone's tested preset replaces some defaults (tapper/resources/presets/)."]
    return "\n".join(lines)


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    variants = report["variants"]
    metrics = list(next(iter(variants.values())).keys()) if variants else []
    table = Table(title=f"{report['task']} on {report.get('backbone', '?')}")
    table.add_column("variant")
    for m in metrics:
        table.add_column(m, justify="right")
    for name, vals in variants.items():
        table.add_row(name, *(f"{vals[m]:.4f}" for m in metrics))
    console = Console()
    console.print(table)
    for gname in sorted({g for v in report.get("groups", {}).values() for g in v}):
        gt = Table(title=f"users: {gname}")
        gt.add_column("variant")
        for m in metrics:
            gt.add_column(m, justify="right")
        for name, groups in report["groups"].items():
            if gname in groups:
                gt.add_row(name, *(f"{groups[gname][m]:.4f}" for m in metrics))
        console.print(gt)
    paired = report.get("paired", {})
    if paired.get("pairs"):
        from tapper.eval.paired import describe

        direction = "higher" if paired["higher_is_better"] else "lower"
        console.print(
            f"paired differences in {paired['metric']} ({direction} is better), mean [95 % bootstrap interval]:"
        )
        for pair, by_group in paired["pairs"].items():
            console.print(f"  {pair}: " + ";  ".join(f"{g} {describe(st)}" for g, st in by_group.items()))
    console.print(
        f"per-user parameters: {report['per_user_params']:,}   shared parameters: {report['shared_params']:,}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tapper",
        description="TAP-PER personalization: experiments, pipelines, serving.",
        epilog="--debug (anywhere on the command line): show the traceback of an error.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "experiment",
        help="run Stage 1, Stage 2 and evaluation directly on LaMP files",
        description="Train Stage 1 and the requested variants on the Stage-2 users and evaluate them on those "
        "users' queries. "
        "Writes DIR/metrics.json and DIR/predictions/<variant>.json.",
    )
    add_data_args(p)
    add_backbone_arg(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--stage2-users",
        type=int,
        default=None,
        help="N most active users trained in Stage 2 and evaluated (default 100)",
    )
    p.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help="comma-separated methods (default: %(default)s); "
        "TAP-PER switches: tap-per, no-bridge, no-pq, no-pu, pq-only, lambda-t0, lambda-o0, lambda0, bm25-kN, L-N",
    )
    p.add_argument(
        "--config",
        help="YAML with run settings (stage1/stage2/eval/stage2_users/seed); default: the backbone's "
        "tested preset (configs/experiment-tiny.yaml, configs/experiment-smollm2-cpu.yaml) "
        "if it has one, else the paper's settings",
    )
    p.add_argument(
        "--user-groups",
        help="JSON of user groups for per-group metrics (default: users.json beside the questions, if any)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_set_arg(p)
    p.add_argument(
        "--help-config", action=HelpConfig, help="list every --set key with its default and meaning, and exit"
    )
    p.set_defaults(func=cmd_experiment)

    from tapper.online.cli import register as register_online

    register_online(sub)

    from tapper.builders.cli import register as register_builders

    register_builders(sub)
    from tapper.analysis.cli import register as register_analysis

    register_analysis(sub)
    from tapper.plan.cli import register as register_plan

    register_plan(sub)
    # The outer layers' commands (serve and bundle from deploy/, the ZenML workflow's from pipelines/) are
    # found through entry points, so the core never imports them (tests/test_layers.py).
    for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        ep.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("TAPPER_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    _quiet_env()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("tapper: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every failure becomes one line unless --debug
        if debug:
            raise
        code = err.code if isinstance(err, CLIError) else 2 if isinstance(err, (ValueError, FileNotFoundError)) else 1
        expected = isinstance(err, (CLIError, ValueError, FileNotFoundError))  # bad input, already in words
        hint = "" if expected else "  (run again with --debug for the traceback)"
        print(f"tapper: error: {one_line(err)}{hint}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
