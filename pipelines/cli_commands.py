"""`tapper` subcommands for the ZenML workflow: train, online-pipeline, promote, lineage, models, ui, stack.

tapper/cli.py calls `register(subparsers)`. Nothing here imports ZenML or
MLflow at import time (only inside the command functions), so `tapper --help`
and the core commands stay fast and work without a ZenML store. Errors are
raised as `tapper.cli.CLIError` (one line, no traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from tapper.cli_args import CLIError


def _env() -> None:
    from pipelines.run import offline_env

    offline_env()
    from pipelines.ui import mend_client

    note = mend_client()
    if note:
        print(note, file=sys.stderr)


def cli_path() -> str:
    """How to call this CLI from the current directory: `tapper` when that is on PATH, else its path
    (`.venv/bin/tapper` after `make install`)."""
    exe = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if exe is None or exe.name != "tapper" or not exe.is_file():
        exe = Path(sys.executable).with_name("tapper")
    on_path = shutil.which("tapper")
    if on_path and Path(on_path).resolve() == exe.resolve():
        return "tapper"
    try:
        return os.path.relpath(exe) if not os.path.relpath(exe).startswith("..") else str(exe)
    except ValueError:
        return str(exe)


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
        "train",
        help="run the ZenML training pipeline (validate -> Stage 1 -> Stage 2 -> evaluate -> promote)",
        description="Run the `training` pipeline on the active ZenML stack with a YAML run config (ZenML's format). "
        "Flags override the config's data and settings, so any LaMP-format files can be run without editing YAML. "
        "Without --questions/--outputs (and none in the config) the embedded default dataset is used.",
    )
    p.add_argument("--config", default=None, help="YAML run config, e.g. configs/quickstart.yaml")
    _add_run_flags(
        p,
        "override a setting: stage2.epochs=6, stage1.lr=0.001, stage2_users=20, variants=[base,tap-per,no-bridge], "
        "compare=true (adds the comparison report), serving_dir=DIR, "
        "promote_if=significantly-better (promote only when the paired 95 %% interval excludes no change) (repeatable)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "online-pipeline",
        help="run the ZenML online_adaptation pipeline (Static / Online-Emb / Online-Full / Full-Retrain)",
        description="Run the `online_adaptation` pipeline on the active ZenML stack: the training pipeline's data, "
        "embedding and Stage-1 steps (from the step cache when a training run used the same settings), then "
        "a bootstrap checkpoint on the earlier half of each evaluation user's history and one step per method "
        "over T chunks of the later half. Trajectories: artifact `online_trajectories` (trajectories.json + "
        "online.png, shown in the dashboard) and MLflow metrics online/<method>/<metric> at step t. "
        "(`tapper online` runs the same simulation directly on files, without ZenML.)",
    )
    p.add_argument(
        "--config", default=None, help="YAML run config with an `online:` section, e.g. configs/online-tiny.yaml"
    )
    _add_run_flags(
        p,
        "override a setting: online.chunks=5, online.lr_emb=0.01, online.methods=[static,online-emb], "
        "stage2.epochs=6 (repeatable)",
    )
    p.set_defaults(func=cmd_online_pipeline)

    p = sub.add_parser(
        "promote",
        help="force a model version to production (recorded as forced)",
        description="Make VERSION the production version in ZenML (stage `production`, the previous one archived) "
        "and in MLflow (alias `production`), recorded as a forced promotion.",
    )
    p.add_argument("version", help="ZenML model version (number or name)")
    p.add_argument("--model", help="model name (default: the only tapper model, e.g. tapper-LaMP_2N)")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser(
        "lineage",
        help="print the chain from input files to a model version",
        description="Artifacts (names, versions, producing steps, run ids) from the input files to MODEL_VERSION "
        "(default: the production version), with the data-quality verdict and the promotion decision.",
    )
    p.add_argument("model_version", nargs="?", help="ZenML model version (default: production, else the latest)")
    p.add_argument("--model", help="model name (default: the only tapper model)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_lineage)

    p = sub.add_parser(
        "models",
        help="model versions: stage, MLflow aliases, metric, promotion decision and date",
        description="Every version of a tapper model from ZenML's Model Control Plane and the MLflow registry: "
        "stage, MLflow version and aliases, the primary metric, and the promotion decision with its "
        "reason and date (the open-source ZenML dashboard does not show models).",
    )
    p.add_argument("name", nargs="?", help="model name (default: the only tapper model, e.g. tapper-LaMP_2N)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "ui",
        aliases=["dashboard"],
        help="start (or --stop) the ZenML dashboard and the MLflow UI",
        description="Start the ZenML dashboard (ZenML's local server) and the MLflow UI on the active stack's "
        "tracking store, in the background, and print where to look: the latest run's DAG, the "
        "training experiment and its latest run. The CLI is not logged in to the dashboard's "
        "server, so stopping it (`tapper ui --stop`) leaves every other command working.",
    )
    p.add_argument("--stop", action="store_true", help="stop the dashboard and the MLflow UI this command started")
    p.add_argument("--port", type=int, default=None, help="dashboard port (default 8237, or the next free one)")
    p.add_argument("--mlflow-port", type=int, default=None, help="MLflow UI port (default 5000, or the next free one)")
    p.add_argument("--no-dashboard", action="store_true", help="only the MLflow UI")
    p.add_argument("--no-mlflow", action="store_true", help="only the ZenML dashboard")
    p.add_argument(
        "--screenshots",
        metavar="DIR",
        help="also save PNG screenshots (headless Chromium) of the latest run's "
        "DAG, its data-quality report, its MLflow run and the registered model version into DIR",
    )
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser(
        "stack",
        help="register the ZenML stacks described in zenml.yaml",
        description="`tapper stack up local` (default; no set-up needed) or `tapper stack up k8s` registers the "
        "stack's components and activates it. `tapper stack show` prints the active stack: each "
        "component with where it keeps its data (artifact store path, MLflow tracking URI).",
    )
    ssub = p.add_subparsers(dest="stack_command", required=True, metavar="ACTION")
    up = ssub.add_parser("up", help="register and activate a stack")
    up.add_argument("name", choices=["local", "k8s"])
    up.add_argument("--dry-run", action="store_true", help="only validate the configuration against ZenML's flavors")
    up.set_defaults(func=cmd_stack_up)
    show = ssub.add_parser("show", help="print the active stack and where each component keeps its data")
    show.set_defaults(func=cmd_stack_show)


# --- train --------------------------------------------------------------------------------


def _run_pipeline(args: argparse.Namespace, resolve, launch):
    """Resolve the run config, then run (or schedule) the pipeline; returns (exit code, run or None)."""
    _env()
    from pipelines.run import RunSetupError

    try:
        cfg = resolve(args.config, args.task, args.questions, args.outputs, args.backbone, args.overrides)
    except RunSetupError as err:
        raise CLIError(str(err)) from None
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
        raise CLIError(str(err)) from None
    except RuntimeError as err:
        raise _report_failure(err, before) from None
    if result is None:
        print("scheduled: the orchestrator runs the pipeline on its schedule (see `zenml pipeline schedule list`)")
        return 0, None
    run = Client().get_pipeline_run(result.id)
    _print_run(run)
    return (0 if str(run.status.value) == "completed" else 1), run


def cmd_train(args: argparse.Namespace) -> int:
    from pipelines.run import resolve_config, run_training

    code, run = _run_pipeline(args, resolve_config, run_training)
    if run is not None and code == 0:
        print_next_steps()
    return code


def print_next_steps() -> None:
    cli = cli_path()
    print("\nnext:")
    print(f"  {cli} models     # versions, stages, metric, promotion decision (the open-source dashboard hides models)")
    print(f"  {cli} lineage    # input files -> data quality -> artifacts -> model version -> promotion")
    print(
        f"  {cli} ui         # ZenML dashboard (run DAG, data-quality report) + MLflow UI; `{cli} ui --stop` ends them"
    )
    if cli != "tapper":
        print(
            f"  (`{cli}` is the CLI this checkout installed; `source {Path(cli).parent}/activate` puts `tapper` on "
            "your PATH)"
        )


def cmd_online_pipeline(args: argparse.Namespace) -> int:
    from pipelines.run import resolve_online_config, run_online_pipeline

    code, run = _run_pipeline(args, resolve_online_config, run_online_pipeline)
    if run is None:
        return code
    try:
        art = run.steps["online_report"].outputs["online_trajectories"][0]
        from tapper.online.cli import print_trajectories

        print_trajectories(art.load().report)
        print(
            f"artifact online_trajectories v{art.version}: {art.uri} (trajectories.json, online.png; also in the "
            "dashboard)"
        )
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


def _report_failure(err: Exception, before: set) -> CLIError:
    """The error for a pipeline run that failed: which step, and for a failed data validation what failed, in
    words, and where the data-quality report is. Returned for the caller to raise (one line, then the details)."""
    from zenml.client import Client

    runs = [r for r in Client().list_pipeline_runs(size=1, sort_by="desc:created") if r.id not in before]
    if not runs:
        return CLIError(
            f"the pipeline did not start: {str(err).splitlines()[0] if str(err) else type(err).__name__}", 1
        )
    run = Client().get_pipeline_run(runs[0].id)
    failed = [n for n, s in run.steps.items() if str(s.status.value) == "failed"]
    if "validate_data" in failed:
        meta: dict = {}
        where = ""
        # The report the failed step saved: the newest one, if it was made during this run.
        arts = Client().list_artifact_versions(name="data_quality_report", sort_by="desc:created", size=1, hydrate=True)
        art = arts.items[0] if arts.items else None
        if (
            art is not None
            and run.start_time is not None
            and art.created.replace(tzinfo=None) >= run.start_time.replace(tzinfo=None)
        ):
            meta = art.run_metadata or {}
            where = f"; report: artifact data_quality_report v{art.version} ({art.uri}), also in `tapper ui`"
        failures = list(meta.get("failures") or [])
        for f in failures:
            print(f"  - {f}", file=sys.stderr)
        files = run.steps["load_data"].config.parameters if "load_data" in run.steps else {}
        names = (
            " / ".join(Path(str(files[k])).name for k in ("questions", "outputs") if files.get(k)) or "the input files"
        )
        return CLIError(
            f"{names} failed data validation ({len(failures) or 'see the report for the'} problem(s) listed above"
            f"{where}); fix the file(s) and run again. Run {run.name}: nothing after validation ran, "
            "no model version was created",
            1,
        )
    return CLIError(
        f"run {run.name} failed in step(s) {', '.join(failed) or '?'}: "
        f"{str(err).splitlines()[0] if str(err) else type(err).__name__}; `zenml logs` / `tapper ui` show its logs",
        1,
    )


def _print_run(run) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"run [bold]{run.name}[/bold] ({run.id}): [bold]{run.status.value.upper()}[/bold]", soft_wrap=True)
    steps = Table(title="steps")
    steps.add_column("step")
    steps.add_column("status")
    steps.add_column("time", justify="right")
    for name, s in run.steps.items():
        took = ""
        if s.start_time and s.end_time:
            took = f"{(s.end_time - s.start_time).total_seconds():.0f} s"
        steps.add_row(name, str(s.status.value), took)
    console.print(steps)
    if run.start_time and run.end_time:
        console.print(f"pipeline time: {(run.end_time - run.start_time).total_seconds() / 60:.1f} min")
    try:
        rep = run.steps["report"].outputs["evaluation_report"][0].load()
    except (KeyError, IndexError):
        return
    print_evaluation(console, rep)
    try:
        if "comparison_report" in run.steps:
            art = run.steps["comparison_report"].outputs["comparison_report"][0]
            console.print(
                f"comparison report: artifact comparison_report v{art.version} ({art.uri}/report.md; "
                "also in the dashboard and in MLflow under comparison/)"
            )
        d = run.steps["promote"].outputs["promotion_decision"][0].load()
        console.print(
            f"model {d.model_name} version {d.model_version}: "
            f"{'[green]PROMOTED[/green]' if d.promoted else '[yellow]not promoted[/yellow]'} — {d.reason}",
            soft_wrap=True,
        )
        if d.bundle_path:
            console.print(f"serving bundle: {d.bundle_path} (published as {d.serving_link})", soft_wrap=True)
        elif d.bundle_error:
            console.print(f"[red]no serving bundle[/red]: {d.bundle_error}", soft_wrap=True)
        reg = run.steps["register_model"].outputs["registration"][0].load()
        if reg.get("mlflow_model"):
            console.print(
                f"MLflow: registered model {reg['mlflow_model']} v{reg['mlflow_version']}, run {reg['mlflow_run_id']} "
                f"({reg['tracking_uri']})",
                soft_wrap=True,
            )
    except (KeyError, IndexError):
        pass


def print_evaluation(console, rep) -> None:
    """The evaluation table, what the labels alone score, and the paired differences with their intervals."""
    from rich.table import Table

    from tapper.eval.paired import describe

    metrics = list(next(iter(rep.variants.values())).keys())
    t = Table(title=f"{rep.task}: {rep.eval_queries} evaluation queries")
    t.add_column("variant")
    for m in metrics:
        t.add_column(m, justify="right")
    for v, ms in rep.variants.items():
        t.add_row(f"[bold]{v}[/bold]" if v == rep.candidate else v, *(f"{ms[m]:.4f}" for m in metrics))
    console.print(t)
    refs = getattr(rep, "references", None) or {}
    if refs:
        console.print(
            f"labels alone ({rep.primary_metric}): "
            + "; ".join(f"{r['what']} {r['score']:.4f}" for r in refs.values()),
            soft_wrap=True,
        )
    pairs = (getattr(rep, "paired", None) or {}).get("pairs") or {}
    if pairs:
        direction = "higher" if rep.higher_is_better else "lower"
        console.print(
            f"paired on the same queries, {rep.primary_metric} difference ({direction} is better), "
            "mean [95 % bootstrap interval]; an interval that contains 0 cannot tell the two apart:",
            soft_wrap=True,
        )
        order = sorted(pairs, key=lambda k: (not k.startswith(rep.candidate), k))
        for pair in order:
            st = pairs[pair]["all"]
            up, down = st["ci95"][0] > 0, st["ci95"][1] < 0
            verdict = ""
            if up or down:
                better = up == rep.higher_is_better
                verdict = (
                    f"  [{'green' if better else 'red'}]({pair.split(' - ')[0]} {'better' if better else 'worse'})[/]"
                )
            console.print(f"  {pair}: {describe(st)}{verdict}", soft_wrap=True)


# --- promote / lineage --------------------------------------------------------------------


def _model_name(given: str | None) -> str:
    from zenml.client import Client

    if given:
        return given
    names = [m.name for m in Client().list_models(size=100) if m.name.startswith("tapper")]
    if len(names) == 1:
        return names[0]
    if not names:
        raise CLIError("no tapper model yet; run `tapper train` first")
    raise CLIError(f"several models ({', '.join(names)}); pass --model NAME (or NAME to `tapper models`)")


def _no_such_version(name: str, version: str) -> CLIError:
    from zenml.client import Client

    numbers = sorted(int(v.number) for v in Client().list_model_versions(model=name, size=100))
    known = ", ".join(map(str, numbers)) if numbers else "none yet"
    return CLIError(f"model {name} has no version {version!r} (versions: {known}); `tapper models` lists them")


def cmd_promote(args: argparse.Namespace) -> int:
    _env()
    from steps.promote import force_promote

    name = _model_name(args.model)
    try:
        d = force_promote(name, args.version)
    except KeyError:
        raise _no_such_version(name, args.version) from None
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
    try:
        info = lineage(name, args.model_version)
    except KeyError:
        raise _no_such_version(name, args.model_version or "production/latest") from None
    if args.json:
        print(json.dumps(info, indent=1, default=str))
    else:
        print_lineage(info)
    return 0


# --- dashboard / stack --------------------------------------------------------------------


def cmd_models(args: argparse.Namespace) -> int:
    _env()
    from pipelines.models import ModelsError, model_versions, print_models

    name = args.name or _model_name(None)
    try:
        rows = model_versions(name)
    except ModelsError as err:
        raise CLIError(str(err)) from None
    if args.json:
        print(json.dumps({"model": name, "versions": rows}, indent=1, default=str))
    else:
        print_models(name, rows)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    _env()
    from pipelines.ui import (
        UIError,
        dashboard_links,
        mlflow_links,
        start_dashboard,
        start_mlflow,
        stop_dashboard,
        stop_mlflow,
    )

    cli = cli_path()
    if args.stop:
        stopped = []
        if not args.no_dashboard and stop_dashboard():
            stopped.append("ZenML dashboard")
        if not args.no_mlflow and stop_mlflow():
            stopped.append("MLflow UI")
        print(f"stopped: {', '.join(stopped)}" if stopped else "nothing to stop: no dashboard or MLflow UI was running")
        return 0
    dash, ml = None, None
    try:
        if not args.no_dashboard:
            links = dashboard_links(start_dashboard(args.port))
            dash = links["dashboard"]
            print(f"ZenML dashboard: {links['dashboard']}")
            if "dashboard_run" in links:
                print(
                    f"  latest run (DAG; click validate_data's data_quality_report for the data-quality report): "
                    f"{links['dashboard_run']}"
                )
        if not args.no_mlflow:
            state = start_mlflow(args.mlflow_port)
            ml = mlflow_links(state["url"], state["tracking_uri"])
            print(f"MLflow UI: {ml.get('mlflow_experiment', ml['mlflow'])}")
            if "mlflow_run" in ml:
                print(f"  latest run: {ml['mlflow_run']}")
            if "mlflow_model_version" in ml:
                print(f"  latest registered model version: {ml['mlflow_model_version']}")
        if args.screenshots:
            from pipelines.screenshots import take_screenshots

            for path in take_screenshots(Path(args.screenshots), dash, ml):
                print(f"screenshot: {path}")
    except UIError as err:
        raise CLIError(str(err), 1) from None
    print(f"models and stages (not in the open-source dashboard): {cli} models")
    print(f"stop both: {cli} ui --stop")
    return 0


def cmd_stack_up(args: argparse.Namespace) -> int:
    _env()
    from pipelines.stacks import StackConfigError, stack_up

    try:
        print(stack_up(args.name, dry_run=args.dry_run))
    except StackConfigError as err:
        raise CLIError(str(err).replace("\n  ", "; ")) from None
    return 0


def cmd_stack_show(args: argparse.Namespace) -> int:
    _env()
    from pipelines.stacks import active_stack_summary

    print(json.dumps(active_stack_summary(), indent=1))
    return 0
