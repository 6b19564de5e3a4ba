"""bench/: the suite's registry covers every script, the results the docs cite exist, `python -m bench` lists it.

Fast (no benchmark runs): the quick suite itself is `make bench`, not part of the default tests."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.suite import BY_NAME, HELPERS, KINDS, REGISTRY

ROOT = Path(__file__).resolve().parent.parent

DOCS = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
CITED = re.compile(r"bench/results/[\w./-]+\.(?:json|png|md)")


def test_every_bench_script_is_registered_or_a_named_helper():
    scripts = {p.name for p in (ROOT / "bench").glob("*.py")}
    registered = {b.script for b in REGISTRY}
    assert scripts - set(HELPERS) == registered, "register the new bench script in bench/suite.py (or name it a helper)"
    assert set(HELPERS) <= scripts | {"__init__.py", "__main__.py"}


@pytest.mark.parametrize("bench", REGISTRY, ids=lambda b: b.name)
def test_each_entry_is_complete(bench):
    assert bench.kind in KINDS and bench.goal and (ROOT / "bench" / bench.script).exists()
    assert "{out}" in bench.args, "the full mode must write the registered results file"
    assert (bench.quick is None) == bool(bench.no_quick), "a benchmark without a quick mode says why"
    if bench.quick is not None:
        assert "{out}" in bench.quick
    for cmd in (bench.args, bench.quick or (), *bench.prepare, *bench.quick_prepare):
        for arg in cmd:
            if arg.startswith("bench/"):
                assert (ROOT / arg).exists(), arg
    assert bench.prepare or not any("{work}" in a for a in bench.args), "{work} is filled only by prepare commands"
    if bench.quick is not None:
        assert bench.quick_prepare or not any("{work}" in a for a in bench.quick)


def test_results_files_are_distinct_and_named_by_spec_and_machine():
    stems = [b.results for b in REGISTRY]
    assert len(stems) == len(set(stems))
    for b in REGISTRY:
        assert b.results_file("cpu").name == f"{b.results}_cpu.json"
        assert b.results_file("cpu", quick=True).parent.name == "quick"
        if b.kind == "science" and b.spec:
            assert b.results == Path(b.spec).stem, "a sweep's results are named by its spec"


def test_specs_are_split_into_science_and_systems_and_each_is_used():
    specs = ROOT / "bench" / "specs"
    assert sorted(p.name for p in specs.iterdir()) == ["science", "systems"]
    systems = {f"bench/specs/systems/{p.name}" for p in (specs / "systems").glob("*.json")}
    assert systems == {b.params for b in REGISTRY if b.kind == "systems"}, "one parameter file per systems benchmark"
    assert all(b.params is None for b in REGISTRY if b.kind == "science")
    used = {a for b in REGISTRY for cmd in (b.args, b.quick or (), *b.prepare, *b.quick_prepare) for a in cmd}
    for p in (specs / "science").glob("*.json"):
        assert f"bench/specs/science/{p.name}" in used, f"{p.name} is run by no benchmark"
    for b in REGISTRY:
        if b.params:
            params = json.loads((ROOT / b.params).read_text())
            assert (tuple(params["full"]), tuple(params["quick"])) == (b.args, b.quick)


def test_a_systems_spec_with_an_unknown_key_is_rejected_naming_the_file(tmp_path, monkeypatch):
    import bench.suite as suite

    (tmp_path / "bench" / "specs" / "systems").mkdir(parents=True)
    spec = tmp_path / "bench" / "specs" / "systems" / "probe.json"
    monkeypatch.setattr(suite, "ROOT", tmp_path)
    spec.write_text(json.dumps({"full": ["--out", "{out}"], "quick": ["--out", "{out}"], "qiuck": []}))
    with pytest.raises(ValueError, match=r"bench/specs/systems/probe.json: unknown keys \['qiuck'\]"):
        suite._systems("probe", "a probe", "probe.py", "probe")
    spec.write_text(json.dumps({"full": ["--out", "{out}"]}))
    with pytest.raises(ValueError, match=r"bench/specs/systems/probe.json: a systems spec is a JSON object"):
        suite._systems("probe", "a probe", "probe.py", "probe")
    spec.write_text(json.dumps({"full": ["--out", "{out}"], "quick": ["--out", "{out}"]}))
    assert suite._systems("probe", "a probe", "probe.py", "probe").quick == ("--out", "{out}")


def test_every_results_file_the_docs_cite_exists():
    missing = []
    for doc in DOCS:
        for path in set(CITED.findall(doc.read_text())):
            if not (ROOT / path).exists():
                missing.append(f"{doc.relative_to(ROOT)}: {path}")
    assert not missing, missing


def test_each_results_page_cites_its_benchmarks_committed_results():
    for b in REGISTRY:
        if b.page is None or not (ROOT / b.page).exists():  # a page another branch adds (throughput.md) is skipped
            continue
        cited = f"bench/results/{b.results}_cpu.json"
        assert cited in (ROOT / b.page).read_text(), f"{b.page} should cite {cited}"
        assert (ROOT / cited).exists(), cited


def test_every_results_page_is_linked_from_the_readme_and_names_its_json():
    readme = (ROOT / "README.md").read_text()
    for page in sorted((ROOT / "docs" / "results").glob("*.md")):
        assert f"docs/results/{page.name}" in readme, page.name
        assert CITED.search(page.read_text()), f"{page.name} names no results file"


def test_readme_is_short_and_keeps_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert "make quickstart" in readme and "make test " in readme


def test_python_m_bench_lists_the_suite():
    out = subprocess.run([sys.executable, "-m", "bench", "list"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for name in BY_NAME:
        assert re.search(rf"^\s+{name}\s", out.stdout, re.M), name
    bad = subprocess.run(
        [sys.executable, "-m", "bench", "no-such-bench"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "python -m bench list" in bad.stderr
