"""Dependencies point inward (tests/layers.py says which way): the core imports no outer layer, steps never the
server, and no module imports itself back through others. The rules are checked on this repository and shown to
fail on a fixture tree that breaks each of them."""

from __future__ import annotations

from pathlib import Path

import pytest

from layers import cycles, import_graph, violations

REPO = Path(__file__).resolve().parents[1]
BROKEN = Path(__file__).resolve().parent / "fixtures" / "layers_broken"


@pytest.fixture(scope="module")
def graph():
    return import_graph(REPO)


def test_the_graph_covers_every_layer(graph):
    packages = {name.split(".")[0] for name in graph}
    assert {"tapper", "deploy", "data_quality", "materializers", "steps", "pipelines"} <= packages
    assert len([n for n in graph if n.startswith("tapper.")]) > 60


def test_every_import_points_inward(graph):
    assert violations(graph) == []


def test_no_import_cycle_anywhere(graph):
    assert cycles(graph) == []


def test_the_core_cli_finds_outer_commands_through_entry_points_only(graph):
    targets = {e.target.split(".")[0] for e in graph["tapper.cli"]}
    assert not targets & {"deploy", "pipelines", "steps"}
    from importlib.metadata import entry_points

    found = {ep.name: ep.value for ep in entry_points(group="tapper.commands")}
    assert found == {"serve": "deploy.serve:register", "workflow": "pipelines.cli_commands:register"}


def test_a_tree_that_breaks_the_rules_is_caught():
    g = import_graph(BROKEN)
    found = violations(g)
    assert any(v.startswith("tapper.core -> steps.train") and "tapper must not import steps" in v for v in found)
    assert any(v.startswith("tapper.core -> zenml") for v in found)
    assert any(v.startswith("steps.train -> deploy.server") for v in found)
    # typing-only imports are not edges; inward imports are allowed
    assert not any("deploy.server" in v and v.startswith("tapper.core") for v in found)
    assert not any(v.startswith("steps.train -> tapper.core") for v in found)
    # the lazy core -> step import closes a cycle with the step's inward import, and a -> b -> a is another
    assert sorted(cycles(g)) == [["steps.train", "tapper.core"], ["tapper.sub.a", "tapper.sub.b"]]
