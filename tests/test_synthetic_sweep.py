"""bench/synthetic_sweep.py: seeds aggregate into mean, sd and paired differences; partial reports merge."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def bench_script(name: str):
    """A bench/ script imported as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sweep = bench_script("synthetic_sweep")

SPEC = {
    "data": {"d": "--users 10"},
    "common": ["stage2.epochs=5"],
    "runs": [{"name": f"A-s{i}", "data": "d", "set": [f"seed={i}"]} for i in range(3)],
}


def row(base, tapper, lam0, tapper_drift, lam0_drift):
    return {
        "base": base,
        "tap-per": tapper,
        "lambda0": lam0,
        "tap-per@drifting": tapper_drift,
        "lambda0@drifting": lam0_drift,
        "seconds": 60,
    }


def part(tmp_path: Path, name: str, results: dict, common=None) -> Path:
    spec = dict(SPEC, common=common or SPEC["common"])
    report = {"machine": {"device": "cpu", "jobs": 1}, "spec": spec, "results": results, "seconds": 100}
    path = tmp_path / name
    path.write_text(json.dumps(report))
    return path


def test_merge_combines_seeds_and_pairs_differences(tmp_path):
    a = part(tmp_path, "a.json", {"A-s0": row(0.40, 0.60, 0.58, 0.50, 0.45), "A-s1": row(0.42, 0.64, 0.60, 0.55, 0.55)})
    b = part(tmp_path, "b.json", {"A-s2": row(0.38, 0.59, 0.61, 0.52, 0.56)})
    report = sweep.merge_reports(SPEC, [a, b])
    group = report["by_group"]["A"]
    assert group["seeds"] == 3 and sorted(report["results"]) == ["A-s0", "A-s1", "A-s2"]
    assert group["tap-per"]["mean"] == pytest.approx(0.61, abs=1e-4)
    assert group["tap-per_minus_base"]["per_seed"] == pytest.approx([0.20, 0.22, 0.21])
    assert group["tap-per_minus_base"]["sd"] == pytest.approx(0.01, abs=1e-4)
    assert group["lambda_gain@drifting"]["per_seed"] == pytest.approx([0.05, 0.0, -0.04])
    assert report["seconds"] == 200 and [p["file"] for p in report["merged_from"]] == ["a.json", "b.json"]


def test_merge_refuses_duplicates_other_settings_and_unknown_runs(tmp_path):
    a = part(tmp_path, "a.json", {"A-s0": row(0.4, 0.6, 0.6, 0.5, 0.5)})
    with pytest.raises(ValueError, match="more than one"):
        sweep.merge_reports(SPEC, [a, a])
    other = part(tmp_path, "o.json", {"A-s1": row(0.4, 0.6, 0.6, 0.5, 0.5)}, common=["stage2.epochs=6"])
    with pytest.raises(ValueError, match="settings"):
        sweep.merge_reports(SPEC, [a, other])
    stray = part(tmp_path, "s.json", {"B-s0": row(0.4, 0.6, 0.6, 0.5, 0.5)})
    with pytest.raises(ValueError, match="not in the spec"):
        sweep.merge_reports(SPEC, [stray])


def test_merge_command_writes_the_combined_report(tmp_path):
    a = part(tmp_path, "a.json", {"A-s0": row(0.4, 0.6, 0.6, 0.5, 0.5)})
    b = part(tmp_path, "b.json", {"A-s1": row(0.4, 0.7, 0.6, 0.5, 0.5)})
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(SPEC))
    out = tmp_path / "all.json"
    assert sweep.main([str(spec_file), "--merge", str(a), str(b), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["by_group"]["A"]["tap-per"]["mean"] == pytest.approx(0.65)


def test_collect_reports_the_finished_runs_of_a_stopped_sweep(tmp_path):
    """What `tapper experiment` leaves in a sweep's work dir: a finished run, one stopped mid-way
    (metrics.json still lists pending variants) and one never started."""

    def metrics(name: str, accuracies: dict, pending: list[str]) -> None:
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(
            json.dumps(
                {
                    "variants": {v: {"accuracy": a} for v, a in accuracies.items()},
                    "pending": pending,
                    "seconds": 700.4,
                    "groups": {v: {"drifting": {"accuracy": a - 0.1, "n": 40}} for v, a in accuracies.items()},
                    "details": {"tap-per": {"lambda_t": 0.5, "lambda_o": 0.5}},
                }
            )
        )

    metrics("A-s0", {"base": 0.4, "tap-per": 0.62, "lambda0": 0.6}, [])
    metrics("A-s1", {"base": 0.41}, ["tap-per", "lambda0"])
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(SPEC))
    out = tmp_path / "collected.json"
    assert sweep.main([str(spec_file), "--collect", "--work", str(tmp_path), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert list(report["results"]) == ["A-s0"] and report["not_finished"] == ["A-s1", "A-s2"]
    assert (
        report["results"]["A-s0"]["tap-per@drifting"] == pytest.approx(0.52)
        and report["results"]["A-s0"]["seconds"] == 700
    )
    assert [r["name"] for r in report["spec"]["runs"]] == ["A-s0"]  # merges with a later report of the rest
    assert report["by_group"]["A"]["tap-per_minus_base"]["per_seed"] == pytest.approx([0.22])
    with pytest.raises(SystemExit):
        sweep.main([str(spec_file), "--collect", "--out", str(out)])  # needs --work


def test_label_counting_oracle_on_a_seeded_build(tmp_path):
    """bench/synthetic_oracle.py: the user's own labels beat popularity; pinned for seed 0."""
    from tapper.builders.synthetic import build_synthetic

    oracle = bench_script("synthetic_oracle")
    build_synthetic(tmp_path / "syn", users=40, seed=0)
    acc = oracle.oracle_accuracy(tmp_path / "syn", 20, [5])
    assert acc["popular"] == {"all": 0.5, "drifting": 0.25, "stable": 0.6667}
    assert acc["count-all"] == {"all": 0.95, "drifting": 0.875, "stable": 1.0}
    assert acc["count-last-5"]["all"] == 0.65


@pytest.mark.parametrize(
    "spec_path", sorted((ROOT / "bench" / "specs" / "science").glob("*.json")), ids=lambda p: p.name
)
def test_every_shipped_sweep_spec_is_valid(spec_path):
    """A typo in a spec's settings would only surface minutes into a sweep; every run's settings must load.

    online_*.json are bench/online_seeds.py's specs: their settings include the `online:` section."""
    from tapper.cli import build_parser
    from tapper.config import load_run_config
    from tapper.online.config import load_online_config

    spec = json.loads(spec_path.read_text())
    assert spec["runs"] and set(spec) >= {"data", "runs"}
    for flags in spec["data"].values():  # the flags `tapper build synthetic` gets
        build_parser().parse_args(["build", "synthetic", "--out", "x", *flags.split()])
    load = load_online_config if spec_path.name.startswith("online_") else load_run_config
    for run in spec["runs"]:
        assert run["data"] in spec["data"], run["name"]
        load({}, list(spec.get("common", [])) + list(run.get("set", [])))
