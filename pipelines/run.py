"""Resolve a run config (YAML in ZenML's run-config format + CLI flags) and run the training pipeline
(or the online_adaptation pipeline: `resolve_online_config` + `run_online_pipeline`).

A config file looks like configs/quickstart.yaml: ZenML's keys (enable_cache,
model, schedule, settings, steps, ...) plus `parameters:` of the `training`
pipeline, whose `run:` section is tapper's RunConfig (validated: unknown
keys are errors). `--set a.b=v` edits `parameters.run` (or another pipeline
parameter, e.g. `--set variants=[base,tap-per,no-bridge]`).
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

PIPELINE_PARAMS = (
    "questions",
    "outputs",
    "task",
    "backbone",
    "run",
    "variants",
    "candidate",
    "min_history",
    "max_history",
    "log_backbone",
    "compare",
    "serving_dir",
    "promote_if",
)
# The online_adaptation pipeline's parameters: the data/backbone/run ones are the training pipeline's
# (so its upstream steps are cache hits), plus `online` (tapper.online.OnlineConfig).
ONLINE_PARAMS = ("questions", "outputs", "task", "backbone", "run", "online", "min_history", "max_history")
RUN_KEYS = ("stage1", "stage2", "eval", "stage2_users", "seed")
NEVER_CACHED = ("register_model", "promote")


class RunSetupError(ValueError):
    pass


def offline_env() -> None:
    from tapper.quiet import quiet

    quiet()
    for k, v in {
        "ZENML_ANALYTICS_OPT_IN": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "ZENML_AUTO_OPEN_DASHBOARD": "false",
        "HF_HUB_OFFLINE": "1",
        "GX_ANALYTICS_ENABLED": "false",
        "TOKENIZERS_PARALLELISM": "false",
        "DO_NOT_TRACK": "1",
        "ZENML_ENABLE_RICH_TRACEBACK": "false",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }.items():
        os.environ.setdefault(k, v)


def _read_config(config: str | Path | dict | None) -> dict:
    """A run config as a fresh dict: a copy of the given dict, the YAML file's contents, or empty."""
    if isinstance(config, dict):
        return copy.deepcopy(config)
    if not config:
        return {}
    path = Path(config)
    if not path.is_file():
        raise RunSetupError(
            f"config file not found: {path} (the shipped ones are in configs/, e.g. configs/quickstart.yaml)"
        )
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise RunSetupError(
            f"{path}{where}: not valid YAML ({getattr(err, 'problem', None) or err}); fix the file"
        ) from None
    if loaded is not None and not isinstance(loaded, dict):
        raise RunSetupError(
            f"{path}: a run config is a YAML mapping (parameters:, model:, ...), got {type(loaded).__name__}"
        )
    return loaded or {}


def check_input_files(questions: str, outputs: str, task: str | None) -> str:
    """Parse both files with tapper's loader before any pipeline starts, so that a file that is not JSON, lacks
    a field or has a gold outside the task's labels stops here with one line naming the file, record and field
    (instead of inside the pipeline, behind a step traceback). Returns the task. The pipeline's validate_data
    step still runs the full data-quality suite and writes its report."""
    from tapper.data import load_lamp
    from tapper.data.types import LampDataError

    try:
        return load_lamp(questions, outputs, task).task
    except LampDataError as err:
        raise RunSetupError(f"{err}; fix the file and run again") from None
    except (KeyError, ValueError) as err:  # e.g. an unknown task name
        raise RunSetupError(f"{Path(outputs).name}: {str(err).strip(chr(39))}; fix the file or pass --task") from None


def resolve_config(
    config: str | Path | dict | None,
    task: str | None = None,
    questions: str | None = None,
    outputs: str | None = None,
    backbone: str | None = None,
    overrides: list[str] | None = None,
) -> dict:
    """The full ZenML run config for one run: file + flags, validated, data paths absolute."""
    from tapper.config import _coerce, load_run_config
    from tapper.data import canonical_task_name

    cfg = _read_config(config)
    params = cfg.setdefault("parameters", {}) or {}
    cfg["parameters"] = params
    unknown = sorted(set(params) - set(PIPELINE_PARAMS))
    if unknown:
        raise RunSetupError(f"{config}: unknown pipeline parameter(s) {unknown}; valid: {list(PIPELINE_PARAMS)}")
    for key, val in (("task", task), ("questions", questions), ("outputs", outputs), ("backbone", backbone)):
        if val is not None:
            params[key] = val
    for item in overrides or []:
        if "=" not in item:
            raise RunSetupError(f"--set {item!r}: expected key=value, e.g. stage2.epochs=6")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if parts[0] == "run":
            parts = parts[1:]
        if parts[0] in RUN_KEYS:
            node = params.setdefault("run", {}) or {}
            params["run"] = node
        elif parts[0] in PIPELINE_PARAMS and len(parts) == 1:
            params[parts[0]] = _coerce(value)
            continue
        else:
            raise RunSetupError(
                f"--set {item!r}: unknown key {parts[0]!r}; valid: {list(RUN_KEYS) + list(PIPELINE_PARAMS)}"
            )
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = _coerce(value)
    # Data: flags, else config, else the embedded default dataset.
    if not params.get("questions") and not params.get("outputs"):
        from tapper.resources import default_dataset_paths

        q, o, t = default_dataset_paths()
        params["questions"], params["outputs"] = str(q), str(o)
        params.setdefault("task", t)
    if not params.get("questions") or not params.get("outputs"):
        raise RunSetupError("give both --questions and --outputs (or neither, for the embedded default dataset)")
    for key in ("questions", "outputs"):
        p = Path(params[key]).expanduser()
        if not p.is_file():
            raise RunSetupError(f"{key} file not found: {p}")
        params[key] = str(p.resolve())
    if params.get("task"):
        try:
            params["task"] = canonical_task_name(params["task"])
        except (KeyError, ValueError) as err:
            raise RunSetupError(f"task: {str(err).strip(chr(39))}") from None
    checked_task = check_input_files(params["questions"], params["outputs"], params.get("task"))
    from tapper.eval.promotion import PROMOTE_IF

    if params.get("promote_if", "better") not in PROMOTE_IF:
        raise RunSetupError(f"promote_if must be one of {list(PROMOTE_IF)}, got {params['promote_if']!r}")
    try:
        run_cfg = load_run_config(params.get("run") or {})  # unknown keys -> error, values checked
        from tapper.methods import check_variants

        check_variants([v for v in params.get("variants") or ["base", "tap-per"]])
    except ValueError as err:
        raise RunSetupError(f"{config or 'run config'}: {err}") from None
    params["run"] = run_cfg.to_dict()
    params.setdefault("backbone", "smollm2")
    # Registration and promotion depend on the world (the current production version), not only on their
    # inputs: they run every time, whatever the config says about caching.
    steps = cfg.setdefault("steps", {}) or {}
    cfg["steps"] = steps
    for name in NEVER_CACHED:
        steps.setdefault(name, {})["enable_cache"] = False
    # A failed step ends the run there: nothing after it can run, so listing each skipped step says nothing.
    cfg.setdefault("execution_mode", "fail_fast")
    # The model (ZenML Model Control Plane + MLflow registry name) is per task: metrics compare within a task.
    task_name = params.get("task") or checked_task
    model = cfg.setdefault("model", {}) or {}
    cfg["model"] = model
    model["name"] = str(model.get("name") or "tapper-{task}").format(task=task_name)
    model.setdefault("description", f"TAP-PER personalization model for {task_name}")
    model.setdefault("tags", ["tapper", task_name])
    model.setdefault("license", "Apache-2.0")
    return cfg


def resolve_online_config(
    config: str | Path | dict | None,
    task: str | None = None,
    questions: str | None = None,
    outputs: str | None = None,
    backbone: str | None = None,
    overrides: list[str] | None = None,
) -> dict:
    """The online_adaptation pipeline's run config: like `resolve_config` (same normalisation of `run`, so the
    shared upstream steps get identical parameters and hit the cache), plus a validated `online:` section.

    A config file looks like configs/online-tiny.yaml; `--set online.chunks=3` edits the `online:` section,
    anything else goes where `resolve_config` puts it. No model version is created (no `model:`): the
    simulation evaluates update strategies, it does not produce a model to promote.
    """
    from tapper.online import load_online_config

    cfg = _read_config(config)
    params = cfg.get("parameters") or {}
    unknown = sorted(set(params) - set(ONLINE_PARAMS))
    if unknown:
        raise RunSetupError(f"{config}: unknown online_adaptation parameter(s) {unknown}; valid: {list(ONLINE_PARAMS)}")
    online = params.pop("online", None) or {}
    cfg["parameters"] = params
    overrides = list(overrides or [])
    online_sets = [o for o in overrides if o.strip().startswith("online.")]
    rest = [o for o in overrides if not o.strip().startswith("online.")]
    for o in rest:
        key = o.split("=", 1)[0].strip().split(".")[0]
        if key in PIPELINE_PARAMS and key not in ONLINE_PARAMS:
            raise RunSetupError(f"--set {o!r}: {key!r} is not a parameter of the online_adaptation pipeline")
    try:
        _, ocfg = load_online_config({"online": online}, online_sets)
    except ValueError as err:
        raise RunSetupError(str(err)) from None
    cfg = resolve_config(cfg, task, questions, outputs, backbone, rest)
    cfg["parameters"]["online"] = ocfg.to_dict()
    cfg.pop("model", None)
    for name in NEVER_CACHED:  # steps of the training pipeline only
        cfg.get("steps", {}).pop(name, None)
    if not cfg.get("steps"):
        cfg.pop("steps", None)
    return cfg


def orchestrator_flavor() -> str:
    from zenml.client import Client

    return Client().active_stack.orchestrator.flavor


# Steps that run before the data is known to be good: a run's model version is created by the first step
# after them, so a run that fails validation creates none.
BEFORE_MODEL = ("load_data", "validate_data")


def training_steps(params: dict) -> list[str]:
    """The step invocations of the training pipeline for these parameters (pipelines/training.py's wiring)."""
    variants = list(params.get("variants") or ["base", "tap-per"])
    candidate = params.get("candidate", "tap-per")
    names = ["load_data", "validate_data", "build_splits", "cache_embeddings", "train_stage1", "train_stage2"]
    for v in variants:
        names.append("evaluate_base" if v == "base" else "evaluate_tapper" if v == candidate else f"evaluate_{v}")
    if candidate not in variants:
        names.append("evaluate_tapper")
    names.append("report")
    if params.get("compare"):
        names.append("comparison_report")
    return names + ["register_model", "promote"]


def model_after_validation(cfg: dict) -> dict:
    """The config with its `model:` moved from the pipeline onto every step after validation. ZenML creates a
    pipeline-level model's version when the run starts, so a run stopped by bad data would still leave a
    version behind; a step-level model's version is created by the first step that has it (one per run)."""
    cfg = copy.deepcopy(cfg)
    model = cfg.pop("model", None)
    if not model:
        return cfg
    steps = cfg.setdefault("steps", {}) or {}
    cfg["steps"] = steps
    for name in training_steps(cfg.get("parameters") or {}):
        if name not in BEFORE_MODEL:
            steps.setdefault(name, {}).setdefault("model", copy.deepcopy(model))
    return cfg


def run_training(cfg: dict, schedule: bool = True):
    """Run (or schedule) the training pipeline with a resolved config; returns the pipeline run response (None if
    scheduled)."""
    from pipelines.training import training

    return run_pipeline(training, model_after_validation(cfg), schedule)


def run_online_pipeline(cfg: dict, schedule: bool = True):
    """Run (or schedule) the online_adaptation pipeline with a config from `resolve_online_config`."""
    from pipelines.online import online_adaptation

    return run_pipeline(online_adaptation, cfg, schedule)


class _QuietValidationFailure:
    """Drops the orchestrator's report of a failed data validation (the step's error and its traceback): the
    files are at fault, not the code, and `tapper train` says what failed in words. The step's own logs in
    the dashboard keep the full message. Any other step failure is reported by ZenML as usual."""

    def filter(self, record) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and type(exc).__name__ == "DataValidationError":
            return False
        return not record.getMessage().startswith("Failed to run step `validate_data`: data validation failed")


class _NoProUpsell:
    """ZenML logs "Models can be viewed in the dashboard using ZenML Pro..." for every step that has a model (all
    steps after validation here); `tapper models` is where this project shows them."""

    def filter(self, record) -> bool:
        return not record.getMessage().startswith("Models can be viewed in the dashboard using ZenML Pro")


def quiet_validation_failures() -> None:
    import logging

    for name, kind in (
        ("zenml.orchestrators.step_launcher", _QuietValidationFailure),
        ("zenml.orchestrators.local.local_orchestrator", _QuietValidationFailure),
        ("zenml.orchestrators.step_run_utils", _NoProUpsell),
    ):
        log = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in log.filters):
            log.addFilter(kind())


def run_pipeline(pipeline_fn, cfg: dict, schedule: bool = True):
    offline_env()
    quiet_validation_failures()
    import materializers  # noqa: F401

    cfg = copy.deepcopy(cfg)
    sched = cfg.pop("schedule", None)
    if sched and schedule:
        flavor = orchestrator_flavor()
        if flavor in ("local", "local_docker"):
            raise RunSetupError(
                f"this run config has a schedule ({sched}), but the active stack's orchestrator is '{flavor}': "
                "local runs cannot be scheduled. Activate the k8s stack (`tapper stack up k8s`), where the schedule "
                "becomes a Kubernetes CronJob, or run once now with --no-schedule."
            )
        cfg["schedule"] = sched
    if orchestrator_flavor() == "local":
        from pipelines.stacks import ensure_mlflow_local, resolve

        tracker = _tracker_uri()
        if tracker and tracker.startswith("sqlite:///"):
            try:
                spec = resolve("local")
                if spec["components"]["experiment_tracker"]["config"]["tracking_uri"] == tracker:
                    ensure_mlflow_local(spec)
            except Exception:  # noqa: BLE001 - best effort; MLflow then uses its defaults
                pass
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False, prefix="tapper-run-") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
        path = f.name
    try:
        return pipeline_fn.with_options(config_path=path)()
    finally:
        os.unlink(path)


def _tracker_uri() -> str | None:
    from zenml.client import Client

    t = Client().active_stack.experiment_tracker
    return getattr(t.config, "tracking_uri", None) if t is not None else None


def pipeline_run_summary(run) -> dict[str, Any]:
    steps = {
        name: str(s.status.value) + (" (cached)" if str(s.status.value) == "cached" else "")
        for name, s in run.steps.items()
    }
    return {"run": run.name, "id": str(run.id), "status": str(run.status.value), "steps": steps}
