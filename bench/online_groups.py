"""Final models of `tapper online` runs scored per user group (drifting / stable).

`tapper online` saves each method's model after the last chunk (DIR/final/<method>/).
Whether Full-Retrain is the upper bound the paper calls it can differ between
users whose preferences changed (where the newest records matter most) and
users whose did not (where all data counts the same); this scores every final
model on the unchanged test queries, with the history the simulation scored them with, split by the groups of the
synthetic build's users.json (or any {"groups": {name: [user ids]}} file).

    python bench/online_groups.py RUN_DIR [RUN_DIR ...] --data DATA_DIR \
        --out bench/results/online_synthetic_groups_cpu.json

Each RUN_DIR is a `tapper online --out` directory made on DATA_DIR's files; its
settings are read back from its trajectories.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def score_run(run_dir: Path, data_dir: Path, groups: dict[str, list[str]]) -> dict:
    from tapper.experiment import embedding_cache, group_metrics, prepare_data
    from tapper.model.backbone import load_backbone_dir
    from tapper.model.tapper import TapPer
    from tapper.online.config import load_online_config
    from tapper.online.simulate import eval_step, predict, stream_split

    report = json.loads((run_dir / "trajectories.json").read_text())
    cfg, ocfg = load_online_config(report["config"])
    data = prepare_data(report.get("task"), data_dir / "questions.json", data_dir / "outputs.json", cfg.stage2_users)
    split = stream_split(data, ocfg.chunks)
    if split.describe() != report["split"]:
        raise ValueError(f"{run_dir}: its split differs from the one {data_dir} gives; not the data it ran on")
    out = {}
    cache = None
    for method_dir in sorted((run_dir / "final").iterdir()):
        # A fresh backbone per model: TapPer.load puts its bridge LoRA on the backbone it is given.
        # The cache (keyed by the frozen embedding matrix, the same in every copy) is opened once.
        bb = load_backbone_dir(run_dir / "stage1")
        if cache is None:
            cache = embedding_cache(bb)
        model = TapPer.load(method_dir, bb.model)
        # The history each method's last point was scored with (Static keeps the bootstrap half).
        preds, _ = predict(
            model, bb, split, data, cfg, cache, eval_step(ocfg, method_dir.name, split.n_chunks), progress=False
        )
        out[method_dir.name] = group_metrics(data, preds, groups)
        # The same predictions scored over everyone must give the trajectory's last point.
        everyone = group_metrics(data, preds, {"all": split.users})["all"][report["metric"]]
        if abs(everyone - report["methods"][method_dir.name][-1]) > 1e-9:
            raise ValueError(
                f"{method_dir}: scores {everyone:.4f}, its trajectory ends at "
                f"{report['methods'][method_dir.name][-1]:.4f}; the saved model is not the one scored"
            )
        print(run_dir.name, method_dir.name, json.dumps(out[method_dir.name]), flush=True)
    return {"metric": report["metric"], "groups": out}


def summarize(runs: dict[str, dict]) -> dict:
    """Per group and method: mean, sd and per-run values; and Full-Retrain − each other method, paired."""
    first = next(iter(runs.values()))
    metric = first["metric"]
    methods = list(first["groups"])
    group_names = sorted({g for m in first["groups"].values() for g in m})
    out: dict = {}
    for g in group_names:
        vals = {m: [r["groups"][m][g][metric] for r in runs.values()] for m in methods}
        entry = {
            m: {
                "mean": round(statistics.mean(v), 4),
                "sd": round(statistics.stdev(v), 4) if len(v) > 1 else 0.0,
                "per_run": [round(x, 4) for x in v],
            }
            for m, v in vals.items()
        }
        if "full-retrain" in vals:
            for m in methods:
                if m != "full-retrain":
                    d = [a - b for a, b in zip(vals["full-retrain"], vals[m])]
                    entry[f"full-retrain_minus_{m}"] = {
                        "mean": round(statistics.mean(d), 4),
                        "per_run": [round(x, 4) for x in d],
                    }
        entry["n"] = first["groups"][methods[0]][g]["n"]
        out[g] = entry
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="`tapper online --out` directories")
    parser.add_argument(
        "--data", type=Path, required=True, help="the build they ran on (questions.json, outputs.json, users.json)"
    )
    parser.add_argument("--groups", type=Path, help="user groups JSON (default DATA/users.json)")
    parser.add_argument("--out", type=Path, required=True, help="result JSON")
    args = parser.parse_args(argv)
    from tapper.atomic import atomic_write_json
    from tapper.experiment import load_user_groups

    groups = load_user_groups(args.groups or args.data / "users.json")
    runs = {str(d): score_run(d, args.data, groups) for d in args.runs}
    report = {"data": str(args.data), "runs": runs, "summary": summarize(runs)}
    atomic_write_json(args.out, report)
    for g, entry in report["summary"].items():
        print(
            f"{g} (n={entry['n']}): "
            + ", ".join(f"{m} {v['mean']:.3f}" for m, v in entry.items() if isinstance(v, dict) and "sd" in v)
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
