"""Register the stacks described in zenml.yaml (`tapper stack up local|k8s`)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from tapper.paths import project_root  # noqa: F401  (re-exported: the stacks' paths are relative to it)

STACKS_FILE = Path(__file__).resolve().parent.parent / "zenml.yaml"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class StackConfigError(ValueError):
    pass


def load_stacks(path: Path | None = None) -> dict:
    return yaml.safe_load(Path(path or STACKS_FILE).read_text())["stacks"]


def expand(value: Any, root: Path, missing: list[str]) -> Any:
    if isinstance(value, dict):
        return {k: expand(v, root, missing) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v, root, missing) for v in value]
    if not isinstance(value, str):
        return value

    def repl(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        got = os.environ.get(name, default)
        if got is None:
            missing.append(name)
            return ""
        return got

    return _VAR.sub(repl, value.replace("{root}", str(root)))


def resolve(name: str, path: Path | None = None) -> dict:
    stacks = load_stacks(path)
    if name not in stacks:
        raise StackConfigError(f"no stack {name!r} in zenml.yaml; stacks: {', '.join(stacks)}")
    missing: list[str] = []
    spec = expand(stacks[name], project_root(), missing)
    spec["missing_env"] = sorted(set(missing))
    return spec


def validate(spec: dict) -> list[str]:
    """Check every component's config against its ZenML flavor's config class; returns problems."""
    from zenml.client import Client
    from zenml.enums import StackComponentType
    from zenml.stack.flavor import Flavor

    problems = []
    client = Client()
    for ctype, comp in spec["components"].items():
        try:
            model = client.get_flavor_by_name_and_type(comp["flavor"], StackComponentType(ctype))
            Flavor.from_model(model).config_class(**comp.get("config", {}))
        except Exception as err:  # noqa: BLE001 - report every problem, not just the first
            problems.append(
                f"{ctype} {comp['name']} ({comp['flavor']}): {type(err).__name__}: {str(err).splitlines()[0]}"
            )
    return problems


def stack_up(name: str, dry_run: bool = False, path: Path | None = None) -> str:
    """Register (or update) the named stack's components and the stack itself, and activate it."""
    from zenml.client import Client
    from zenml.enums import StackComponentType

    spec = resolve(name, path)
    if spec["missing_env"]:
        raise StackConfigError(f"stack {name!r} needs environment variables: {', '.join(spec['missing_env'])}")
    problems = validate(spec)
    if problems:
        raise StackConfigError(f"stack {name!r} has invalid components:\n  " + "\n  ".join(problems))
    if dry_run:
        return f"stack {name!r}: configuration valid (dry run, nothing registered)"
    client = Client()
    components = {}
    for ctype, comp in spec["components"].items():
        t = StackComponentType(ctype)
        config = comp.get("config", {})
        if ctype == "artifact_store" and comp["flavor"] == "local":
            comp = dict(comp, name=f"{comp['name']}-{local_store_id(Path(config['path']))}")
        try:
            client.get_stack_component(t, comp["name"], allow_name_prefix_match=False)
            client.update_stack_component(comp["name"], t, configuration=config)
        except KeyError:
            client.create_stack_component(comp["name"], comp["flavor"], t, config)
        components[t] = comp["name"]
    stack_name = f"tapper-{name}"
    try:
        client.get_stack(stack_name, allow_name_prefix_match=False)
        client.update_stack(stack_name, component_updates={t: [n] for t, n in components.items()})
    except KeyError:
        client.create_stack(stack_name, components=components)
    client.activate_stack(stack_name)
    if spec.get("mlflow_artifacts"):
        ensure_mlflow_local(spec)
    return f"stack {stack_name!r} registered and active"


STORE_ID_FILE = ".tapper-store-id"


def local_store_id(path: Path) -> str:
    """An id for the local artifact store at `path`, kept in a file inside it.

    ZenML's step cache is keyed by the artifact store component, and the ZenML store is per machine
    user. A checkout deleted and cloned again at the same path would otherwise get the old component
    back and reuse cached steps whose artifact files went with the old checkout. A directory without
    the id file holds none of the old artifacts, so it gets a new id, a new component, a new cache."""
    import uuid

    marker = path / STORE_ID_FILE
    if marker.is_file():
        return marker.read_text().strip()
    path.mkdir(parents=True, exist_ok=True)
    store_id = uuid.uuid4().hex[:12]
    marker.write_text(store_id + "\n")
    return store_id


EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def ensure_mlflow_local(spec: dict | None = None) -> None:
    """Local MLflow: the SQLite DB's directory exists and the experiment stores artifacts in the project."""
    spec = spec or resolve("local")
    uri = spec["components"]["experiment_tracker"]["config"]["tracking_uri"]
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    art = Path(spec["mlflow_artifacts"])
    art.mkdir(parents=True, exist_ok=True)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("training")
    exp_id = (
        exp.experiment_id if exp is not None else client.create_experiment("training", artifact_location=art.as_uri())
    )
    # The MLflow UI shows an experiment without a kind in its GenAI layout (traces, judges, prompts); ours is
    # model training: runs, metrics, registered models.
    if exp is None or exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


# Component settings worth showing: where each keeps its data. Nothing secret (tokens, keys) is listed.
SHOWN_CONFIG = ("path", "tracking_uri", "uri", "kubernetes_context", "kubernetes_namespace")


def active_stack_summary() -> dict:
    """The active stack: each component's name, flavor and where it keeps its data."""
    from zenml.client import Client

    stack = Client().active_stack_model
    components: dict = {}
    for t, cs in stack.components.items():
        for c in cs:
            config = {k: v for k, v in (c.configuration or {}).items() if k in SHOWN_CONFIG and v}
            if str(t.value) == "model_registry" and c.flavor_name == "mlflow":
                config.setdefault("registry", "the experiment tracker's MLflow store")
            components[str(t.value)] = {"name": c.name, "flavor": c.flavor_name, **config}
    return {"name": stack.name, "components": components}
