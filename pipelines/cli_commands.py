"""`tapper` subcommands for the ZenML workflow: train, online-pipeline, promote, lineage, dashboard, stack.

tapper/cli.py calls `register(subparsers)`. Nothing here imports ZenML or
MLflow at import time (only inside the command functions), so `tapper --help`
and the core commands stay fast and work without a ZenML store.
"""
from __future__ import annotations

import argparse
import json
import sys


def _env() -> None:
    from pipelines.run import offline_env

    offline_env()


def _add_run_flags(p: argparse.ArgumentParser, set_help: str) -> None:
    """Flags every pipeline-running command shares: data and backbone overrides, --set, schedule/cache/print."""
    p.add_argument("--task", help="LaMP task (default: the config's, else from the outputs file)")
    p.add_argument("--questions", help="LaMP questions JSON")
    p.add_argument("--outputs", help="LaMP outputs JSON (golds)")
    p.add_argument("--backbone", help="tiny | smollm2 | <HF hub id or local path>")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    p.add_argument("--no-schedule", action="store_true", help="ignore the config's schedule and run once now")
    p.add_argument("--no-cache", action="store_true", help="disable the step cache for this run")
    p.add_argument("--print-config", action="store_true", help="print the resolved run config and exit")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="run the ZenML training pipeline (validate -> Stage 1 -> Stage 2 -> evaluate -> promote)",
        description="Run the `training` pipeline on the active ZenML stack with a YAML run config (ZenML's format). "
                    "Flags override the config's data and settings, so any LaMP-format files can be run without editing YAML. "
                    "Without --questions/--outputs (and none in the config) the embedded default dataset is used.")
    p.add_argument("--config", default=None, help="YAML run config, e.g. configs/quickstart.yaml")
    _add_run_flags(p, "override a setting: stage2.epochs=6, stage1.lr=0.001, stage2_users=20, variants=[base,tap-per,no-bridge], "
                      "compare=true (adds the comparison report), serving_dir=DIR, "
                      "promote_if=significantly-better (promote only when the paired 95 %% interval excludes no change) (repeatable)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "online-pipeline", help="run the ZenML online_adaptation pipeline (Static / Online-Emb / Online-Full / Full-Retrain)",
        description="Run the `online_adaptation` pipeline on the active ZenML stack: the training pipeline's data, "
                    "embedding and Stage-1 steps (from the step cache when a training run used the same settings), then "
                    "a bootstrap checkpoint on the earlier half of each evaluation user's history and one step per method "
                    "over T chunks of the later half. Trajectories: artifact `online_trajectories` (trajectories.json + "
                    "online.png, shown in the dashboard) and MLflow metrics online/<method>/<metric> at step t. "
                    "(`tapper online` runs the same simulation directly on files, without ZenML.)")
    p.add_argument("--config", default=None, help="YAML run config with an `online:` section, e.g. configs/online-tiny.yaml")
    _add_run_flags(p, "override a setting: online.chunks=5, online.lr_emb=0.01, online.methods=[static,online-emb], "
                      "stage2.epochs=6 (repeatable)")
    p.set_defaults(func=cmd_online_pipeline)

    p = sub.add_parser("promote", help="force a model version to production (recorded as forced)",
                       description="Make VERSION the production version in ZenML (stage `production`, the previous one archived) "
                                   "and in MLflow (alias `production`), recorded as a forced promotion.")
    p.add_argument("version", help="ZenML model version (number or name)")
    p.add_argument("--model", help="model name (default: the only tapper model, e.g. tapper-LaMP_2N)")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("lineage", help="print the chain from input files to a model version",
                       description="Artifacts (names, versions, producing steps, run ids) from the input files to MODEL_VERSION "
                                   "(default: the production version), with the data-quality verdict and the promotion decision.")
    p.add_argument("model_version", nargs="?", help="ZenML model version (default: production, else the latest)")
    p.add_argument("--model", help="model name (default: the only tapper model)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_lineage)

    p = sub.add_parser("dashboard", help="start the local ZenML dashboard",
                       description="Start the local ZenML server + dashboard (`zenml login --local`) and print its URL.")
    p.add_argument("--port", type=int, default=None, help="port (default: ZenML's, 8237)")
    p.add_argument("--blocking", action="store_true", help="run in the foreground until Ctrl-C")
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("stack", help="register the ZenML stacks described in zenml.yaml",
                       description="`tapper stack up local` (default; no set-up needed) or `tapper stack up k8s` registers the "
                                   "stack's components and activates it. `tapper stack show` prints the active stack.")
    ssub = p.add_subparsers(dest="stack_command", required=True, metavar="ACTION")
    up = ssub.add_parser("up", help="register and activate a stack")
    up.add_argument("name", choices=["local", "k8s"])
    up.add_argument("--dry-run", action="store_true", help="only validate the configuration against ZenML's flavors")
    up.set_defaults(func=cmd_stack_up)
    show = ssub.add_parser("show", help="print the active stack")
    show.set_defaults(func=cmd_stack_show)


# --- train --------------------------------------------------------------------------------

def _run_pipeline(args: argparse.Namespace, resolve, launch):
    """Resolve the run config, then run (or schedule) the pipeline; returns (exit code, run or None)."""
    _env()
    from pipelines.run import RunSetupError

    try:
        cfg = resolve(args.config, args.task, args.questions, args.outputs, args.backbone, args.overrides)
    except RunSetupError as err:
        print(f"tapper: error: {err}", file=sys.stderr)
        return 2, None
    if args.no_cache:
        cfg["enable_cache"] = False
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg, sort_keys=False))
        return 0, None
    _ensure_stack()
    from zenml.client import Client

    before = {r.id for r in Client().list_pipeline_runs(size=1, sort_by="desc:created")}
    try:
        result = launch(cfg, schedule=not args.no_schedule)
    except RunSetupError as err:
        print(f"tapper: error: {err}", file=sys.stderr)
        return 2, None
    except RuntimeError as err:
        return _report_failure(err, before), None
    if result is None:
        print("scheduled: the orchestrator runs the pipeline on its schedule (see `zenml pipeline schedule list`)")
        return 0, None
    run = Client().get_pipeline_run(result.id)
    _print_run(run)
    return (0 if str(run.status.value) == "completed" else 1), run


def cmd_train(args: argparse.Namespace) -> int:
    from pipelines.run import resolve_config, run_training

    code, _ = _run_pipeline(args, resolve_config, run_training)
    return code


def cmd_online_pipeline(args: argparse.Namespace) -> int:
    from pipelines.run import resolve_online_config, run_online_pipeline

    code, run = _run_pipeline(args, resolve_online_config, run_online_pipeline)
    if run is None:
        return code
    try:
        art = run.steps["online_report"].outputs["online_trajectories"][0]
        from tapper.online.cli import print_trajectories

        print_trajectories(art.load().report)
        print(f"artifact online_trajectories v{art.version}: {art.uri} (trajectories.json, online.png; also in the dashboard)")
    except (KeyError, IndexError):
        pass
    return code


def _ensure_stack() -> None:
    """The default: if the active stack is ZenML's bare `default`, register and activate `tapper-local`.

    If `tapper-local` is already active it is re-pointed at this checkout: the ZenML store is per
    machine user, so a second checkout would otherwise write into (and reuse cached steps from)
    the first checkout's artifact store, which may since have been deleted."""
    from zenml.client import Client

    if Client().active_stack_model.name in ("default", "tapper-local"):
        from pipelines.stacks import stack_up

        print(stack_up("local"))


def _report_failure(err: Exception, before: set) -> int:
    from zenml.client import Client

    runs = [r for r in Client().list_pipeline_runs(size=1, sort_by="desc:created") if r.id not in before]
    if not runs:
        print(f"tapper: error: {err}", file=sys.stderr)
        return 1
    run = Client().get_pipeline_run(runs[0].id)
    failed = [n for n, s in run.steps.items() if str(s.status.value) == "failed"]
    print(f"run {run.name}: {run.status.value}; failed step(s): {', '.join(failed) or '?'}", file=sys.stderr)
    if "validate_data" in failed:
        try:
            art = Client().get_artifact_version("data_quality_report")
            meta = art.run_metadata or {}
            print("data validation failed:", file=sys.stderr)
            for f in meta.get("failures", []):
                print(f"  - {f}", file=sys.stderr)
            print(f"data-quality report: {art.uri} (artifact data_quality_report v{art.version}; also in the dashboard)",
                  file=sys.stderr)
        except KeyError:
            pass
        print("nothing downstream ran; no model version was promoted", file=sys.stderr)
    return 1


def _print_run(run) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"run [bold]{run.name}[/bold] ({run.id}): [bold]{run.status.value.upper()}[/bold]")
    steps = Table(title="steps")
    steps.add_column("step")
    steps.add_column("status")
    for name, s in run.steps.items():
        steps.add_row(name, str(s.status.value))
    console.print(steps)
    try:
        rep = run.steps["report"].outputs["evaluation_report"][0].load()
        t = Table(title=f"{rep.task}: {rep.eval_queries} evaluation queries")
        metrics = list(next(iter(rep.variants.values())).keys())
        t.add_column("variant")
        for m in metrics:
            t.add_column(m, justify="right")
        for v, ms in rep.variants.items():
            t.add_row(v, *(f"{ms[m]:.4f}" for m in metrics))
        console.print(t)
        if "comparison_report" in run.steps:
            art = run.steps["comparison_report"].outputs["comparison_report"][0]
            console.print(f"comparison report: artifact comparison_report v{art.version} ({art.uri}/report.md; "
                          "also in the dashboard and in MLflow under comparison/)")
        d = run.steps["promote"].outputs["promotion_decision"][0].load()
        console.print(f"model {d.model_name} version {d.model_version}: "
                      f"{'[green]PROMOTED[/green]' if d.promoted else '[yellow]not promoted[/yellow]'} — {d.reason}")
        if d.bundle_path:
            console.print(f"serving bundle: {d.bundle_path} (published as {d.serving_link})")
        elif d.bundle_error:
            console.print(f"[red]no serving bundle[/red]: {d.bundle_error}")
        reg = run.steps["register_model"].outputs["registration"][0].load()
        if reg.get("mlflow_model"):
            console.print(f"MLflow: registered model {reg['mlflow_model']} v{reg['mlflow_version']}, run {reg['mlflow_run_id']} "
                          f"({reg['tracking_uri']})")
    except (KeyError, IndexError):
        pass


# --- promote / lineage --------------------------------------------------------------------

def _model_name(given: str | None) -> str:
    from zenml.client import Client

    if given:
        return given
    names = [m.name for m in Client().list_models(size=100) if m.name.startswith("tapper")]
    if len(names) == 1:
        return names[0]
    if not names:
        raise SystemExit("tapper: error: no tapper model yet; run `tapper train` first")
    raise SystemExit(f"tapper: error: several models ({', '.join(names)}); pass --model")


def cmd_promote(args: argparse.Namespace) -> int:
    _env()
    from steps.promote import force_promote

    name = _model_name(args.model)
    try:
        d = force_promote(name, args.version)
    except KeyError as err:
        print(f"tapper: error: {err}", file=sys.stderr)
        return 2
    print(f"{name} version {d.model_version} is now production (forced by hand; recorded as such)")
    if d.archived_version:
        print(f"previous production version {d.archived_version} archived")
    if d.mlflow_model:
        print(f"MLflow: {d.mlflow_model} v{d.mlflow_version} has alias 'production'")
    if d.bundle_path:
        print(f"serving bundle: {d.bundle_path} (published as {d.serving_link})")
    elif d.bundle_error:
        print(f"no serving bundle: {d.bundle_error}", file=sys.stderr)
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    _env()
    from pipelines.lineage import lineage, print_lineage

    name = _model_name(args.model)
    info = lineage(name, args.model_version)
    if args.json:
        print(json.dumps(info, indent=1, default=str))
    else:
        print_lineage(info)
    return 0


# --- dashboard / stack --------------------------------------------------------------------

def cmd_dashboard(args: argparse.Namespace) -> int:
    _env()
    import shutil
    import subprocess

    zenml = shutil.which("zenml") or str(__import__("pathlib").Path(sys.executable).with_name("zenml"))
    cmd = [zenml, "login", "--local"]
    if args.port:
        cmd += ["--port", str(args.port)]
    if args.blocking:
        cmd.append("--blocking")
    print("starting the local ZenML dashboard:", " ".join(cmd))
    return subprocess.call(cmd)


def cmd_stack_up(args: argparse.Namespace) -> int:
    _env()
    from pipelines.stacks import StackConfigError, stack_up

    try:
        print(stack_up(args.name, dry_run=args.dry_run))
    except StackConfigError as err:
        print(f"tapper: error: {err}", file=sys.stderr)
        return 2
    return 0


def cmd_stack_show(args: argparse.Namespace) -> int:
    _env()
    from pipelines.stacks import active_stack_summary

    print(json.dumps(active_stack_summary(), indent=1))
    return 0
