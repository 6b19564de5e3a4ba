"""`tapper plan --config C [--gpu-mem 80GB]`: the memory each stage of a run config needs on one accelerator."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_config_file(path: str | Path, backbone: str | None = None, overrides: list[str] | None = None):
    """(backbone spec, RunConfig) of a ZenML run config (parameters.run, parameters.backbone) or a RunConfig YAML."""
    import yaml

    from tapper.config import load_run_config

    data = yaml.safe_load(Path(path).read_text()) or {}
    if "parameters" in data:
        params = data["parameters"]
        return backbone or params.get("backbone"), load_run_config(params.get("run", {}), overrides)
    return backbone, load_run_config(data, overrides)


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f}"


def print_plan(plan: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(
        title=f"memory plan: {plan['backbone']} on {plan['gpu_mem'] / 1e9:g} GB "
        f"(plan fills at most {plan['usable']:.0%}: {_gib(plan['budget'])} GiB), GiB"
    )
    for col in (
        "stage",
        "dtype",
        "micro-batch",
        "weights",
        "grads",
        "optimizer",
        "activations",
        "act. ckpt",
        "workspace",
        "peak",
        "fits",
        "largest micro-batch (ckpt)",
    ):
        t.add_column(col, justify="right")
    for name, s in plan["stages"].items():
        ckpt = s["checkpointing"]
        t.add_row(
            name,
            s["extra"].get("dtype", ""),
            f"{s['micro_batch']}{' ckpt' if ckpt else ''}",
            _gib(s["weights"]),
            _gib(s["gradients"]),
            _gib(s["optimizer"]),
            _gib(s["activations"]),
            _gib(s["activations_ckpt"]),
            _gib(s["workspace_ckpt"] if ckpt else s["workspace"]),
            _gib(s["peak"]),
            "yes" if s["fits"] else "NO",
            f"{s['largest_micro_batch_without_checkpointing']} ({s['largest_micro_batch_with_checkpointing']})",
        )
    Console(width=160).print(t)
    print(
        f"sequences at max_len, half of them targets; Stage-2 histories of {plan['history']} records "
        f"(--history); {'every stage fits' if plan['fits'] else 'some stage does NOT fit'}"
    )


def cmd_plan(args: argparse.Namespace) -> int:
    from tapper.plan.plan import parse_bytes, plan_run

    backbone, cfg = load_config_file(args.config, args.backbone, args.overrides)
    if not backbone:
        raise ValueError(f"{args.config} names no backbone: pass --backbone")
    plan = plan_run(backbone, cfg, parse_bytes(args.gpu_mem), history=args.history)
    if args.json:
        print(json.dumps(plan, indent=2))
    else:
        print_plan(plan)
    return 0 if plan["fits"] else 1


def register(sub) -> None:
    from tapper.cli_args import add_set_arg

    p = sub.add_parser(
        "plan",
        help="memory each stage needs on one accelerator, and the largest micro-batch that fits",
        description="Weights, gradients, optimizer state and activations (with and without gradient "
        "checkpointing) of Stage 1, Stage 2 and evaluation, from the real modules built on "
        "the meta device (no weights are loaded). Exit status 1 if a stage does not fit.",
    )
    p.add_argument("--config", required=True, help="a run config (configs/*.yaml)")
    p.add_argument("--gpu-mem", default="80GB", help="accelerator memory: 80GB, 80GiB, ... (default: %(default)s)")
    p.add_argument("--backbone", help="backbone spec (default: the config's parameters.backbone)")
    p.add_argument(
        "--history", type=int, default=512, help="history records per Stage-2 example (default: %(default)s)"
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_set_arg(p)
    p.set_defaults(func=cmd_plan)
