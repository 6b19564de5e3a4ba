"""bench/online_seeds.py: real `tapper online` runs over seeds, their summary, adopting and merging runs."""

from __future__ import annotations

import json

import pytest

from test_synthetic_sweep import bench_script

seeds = bench_script("online_seeds")

# Small enough for a test: 10 users, 3 of them streamed in 2 chunks, Stage 1 skipped.
SPEC = {
    "data": {"d": "--users 10 --history 8 11 --seed 1"},
    "users": 3,
    "common": [
        "stage1.skip=true",
        "stage2.epochs=1",
        "stage2.lr=0.01",
        "stage2.batch_size=8",
        "online.chunks=2",
        "online.lr_emb=0.05",
    ],
    "runs": [{"name": f"O-s{i}", "data": "d", "set": [f"seed={i}"]} for i in range(2)],
}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("online_seeds")
    spec_file = root / "spec.json"
    spec_file.write_text(json.dumps(SPEC))
    out = root / "all.json"
    assert seeds.main([str(spec_file), "--jobs", "2", "--work", str(root / "work"), "--out", str(out)]) == 0
    return root, spec_file, json.loads(out.read_text())


def test_seeds_run_and_summarise(swept):
    root, _, report = swept
    assert sorted(report["results"]) == ["O-s0", "O-s1"]
    summary = report["summary"]
    assert summary["seeds"] == 2 and summary["fractions"] == [0.5, 0.75, 1.0]
    runs = [report["results"][n]["methods"] for n in ("O-s0", "O-s1")]
    for method, points in summary["methods"].items():
        assert [p["mean"] for p in points] == pytest.approx(
            [(a + b) / 2 for a, b in zip(runs[0][method], runs[1][method])], abs=1e-4
        )
    # Static never moves, so its sd over seeds is the same at every step.
    assert len({p["sd"] for p in summary["methods"]["static"]}) == 1
    gap = summary["differences"]["full-retrain_minus_online-full"]
    assert [g["per_seed"] for g in gap] == [
        [round(r["full-retrain"][t] - r["online-full"][t], 4) for r in runs] for t in range(3)
    ]
    assert gap[0]["per_seed"] == [0.0, 0.0] and gap[0]["seeds_a_not_worse"] == 2  # one bootstrap, one R_0
    assert summary["cost"]["static"]["params_touched_per_chunk"] == 0
    assert (root / "all.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_adopted_run_counts_as_its_seed_and_reruns_repeat(swept):
    root, spec_file, report = swept
    out = root / "again.json"
    first = root / "work" / "runs" / "O-s0" / "trajectories.json"
    assert (
        seeds.main(
            [
                str(spec_file),
                "--adopt",
                f"O-s0={first}",
                "--runs",
                "O-s1",
                "--out",
                str(out),
                "--work",
                str(root / "work2"),
            ]
        )
        == 0
    )
    again = json.loads(out.read_text())
    # O-s1 ran again in a new process: the same seed gives the same trajectory.
    for name in ("O-s0", "O-s1"):
        assert again["results"][name]["methods"] == report["results"][name]["methods"]
    assert again["summary"]["methods"] == report["summary"]["methods"]


def test_adopt_refuses_other_settings(swept):
    root, _, _ = swept
    trajectories = root / "work" / "runs" / "O-s0" / "trajectories.json"
    with pytest.raises(ValueError, match=r"seed: spec 1, run 0"):
        seeds.adopt(SPEC, "O-s1", trajectories)
    with pytest.raises(ValueError, match="not in the spec"):
        seeds.adopt(SPEC, "O-s9", trajectories)


def test_merge_combines_parts_and_refuses_overlap(swept, tmp_path):
    _, _, report = swept
    parts = []
    for name in ("O-s0", "O-s1"):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(dict(report, results={name: report["results"][name]})))
        parts.append(path)
    merged = seeds.merge_reports(SPEC, parts)
    assert merged["summary"] == report["summary"]
    with pytest.raises(ValueError, match="more than one"):
        seeds.merge_reports(SPEC, [parts[0], parts[0]])


def test_final_models_scored_per_user_group(swept, tmp_path):
    """bench/online_groups.py: each saved final model re-scored per group; over all users it must equal
    the trajectory's last point (the script refuses otherwise), and the groups split the queries."""
    root, _, report = swept
    groups = bench_script("online_groups")
    runs = [root / "work" / "runs" / name for name in ("O-s0", "O-s1")]
    out = tmp_path / "groups.json"
    assert groups.main([*map(str, runs), "--data", str(root / "work" / "d"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    summary = result["summary"]
    assert set(summary) <= {"drifting", "stable"} and summary
    per_run = result["runs"][str(runs[0])]["groups"]
    assert set(per_run) == {"static", "online-emb", "online-full", "full-retrain"}
    n_eval = report["results"]["O-s0"]["split"]["eval_queries"]
    assert sum(entry["n"] for entry in summary.values()) == n_eval
