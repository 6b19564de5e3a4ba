"""Analyses (issue 4): footprint counted from the real modules, report with bold best, attention heatmap, CLI."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig

from model_fixtures import TASK, tiny_examples
from tapper.analysis.attention import case_study, plot_case_study, summaries, temporal_bias_off
from tapper.analysis.footprint import footprint, lora_numel, oppu_state_numel, tapper_state_numel
from tapper.analysis.report import markdown_table, ranks, write_report
from tapper.config import Stage2Config
from tapper.experiment import embedding_cache
from tapper.model.backbone import load_backbone_dir
from tapper.model.lora import attach_lora
from tapper.model.tapper import TapPer
from tapper.train.stage2 import encoder_for


@pytest.fixture(scope="module")
def data():
    return tiny_examples(n_users=3, n_hist=5)


def _stored(model: TapPer) -> int:
    return sum(v.numel() for v in model.state_tensors().values())


@pytest.mark.parametrize("switch", [{}, {"use_pu": False}, {"prefix_len": 4, "bridge_r": 2}, {"use_bridge": False}])
def test_footprint_counts_equal_the_instantiated_model(backbone, switch):
    """The meta-device count equals the numel of what a real TapPer on the tiny backbone stores."""
    config = AutoConfig.from_pretrained(backbone.path)
    cfg = Stage2Config(**switch)
    for n in (1, 3):
        real = TapPer(load_backbone_dir(backbone.path).model, [f"u{i}" for i in range(n)], cfg)
        assert tapper_state_numel(config, cfg, n) == _stored(real)
    # OPPU: one LoRA (r=8 on q,v) per user = numel of the adapter attach_lora really creates.
    peft = attach_lora(load_backbone_dir(backbone.path).model, 8, 8, 0.0, ["q_proj", "v_proj"])
    real_lora = sum(p.numel() for n, p in peft.named_parameters() if "lora_" in n)
    assert lora_numel(config, 8, 8, ["q_proj", "v_proj"]) == real_lora
    assert oppu_state_numel(config, 8, 8, ("q_proj", "v_proj"), n_users=7) == 7 * real_lora


def test_footprint_scales_to_a_million_users_without_allocating(backbone):
    fp = footprint(str(backbone.path), user_counts=(100, 1_000_000))
    d, L = fp["hidden_size"], fp["prefix_len"]
    tp, pq, op = (fp["methods"][k] for k in ("tap-per", "pq-only", "oppu"))
    assert tp["per_user"] == L * d and pq["per_user"] == 0 and op["shared"] == 0
    assert tp["shared"] == pq["shared"] > 0
    assert tp["total"][1] == tp["shared"] + 1_000_000 * L * d and pq["total"][0] == pq["total"][1]
    assert op["total"][1] == 1_000_000 * op["per_user"]
    assert fp["oppu_over_tapper_per_user"] == round(op["per_user"] / (L * d), 2)


def _metrics(task="LaMP_2N"):
    return {
        "task": task,
        "backbone": "tiny",
        "variants": {
            "base": {"accuracy": 0.40, "f1": 0.20},
            "rag-k1": {"accuracy": 0.45, "f1": 0.22},
            "oppu": {"accuracy": 0.50, "f1": 0.30},
            "pq-only": {"accuracy": 0.55, "f1": 0.25},
            "tap-per": {"accuracy": 0.60, "f1": 0.28},
            "no-bridge": {"accuracy": 0.52, "f1": 0.21},
            "bm25-k2": {"accuracy": 0.58, "f1": 0.27},
            "L-4": {"accuracy": 0.57, "f1": 0.26},
        },
        "params": {"oppu": {"per_user": 16384, "shared": 0}, "tap-per": {"per_user": 1024, "shared": 230000}},
        "details": {"tap-per": {"seconds": 12.0, "losses": [2.0, 1.5, 1.2], "lambda_t": 0.2, "lambda_o": 0.1}},
        "groups": {
            "tap-per": {"drifting": {"accuracy": 0.5, "f1": 0.2, "n": 4}},
            "base": {"drifting": {"accuracy": 0.3, "f1": 0.1, "n": 4}},
        },
        "config": {"stage2": {"prefix_len": 8}},
        "data": {
            "users": 10,
            "stage1_users": 7,
            "stage2_users": 3,
            "stage1_examples": 30,
            "stage2_examples": 20,
            "eval_queries": 6,
        },
        "per_user_params": 1024,
        "shared_params": 230000,
        "stage1": {"losses": [2.5, 2.0], "weights_hash": "ab12"},
        "seconds": 30.0,
    }


def test_report_marks_the_best_per_metric_in_bold(tmp_path):
    files = write_report(_metrics(), tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert files[0].name == "report.md" and all(f.exists() and f.stat().st_size > 0 for f in files)
    assert {f.name for f in files} >= {"comparison.png", "ablation.png", "sensitivity.png", "losses.png"}
    comparison = md.split("### Comparison")[1].split("###")[0]
    row = lambda name: next(line for line in comparison.splitlines() if line.startswith(f"| {name} |"))  # noqa: E731
    # accuracy: TAP-PER best, P_q-only second; F1: OPPU best, TAP-PER second.
    assert "**0.6000**" in row("TAP-PER (full)") and "<u>0.2800</u>" in row("TAP-PER (full)")
    assert "**0.3000**" in row("OPPU") and "<u>0.5500</u>" in row("TAP-PER P_q-only")
    table = "\n".join(line for line in comparison.splitlines() if line.startswith("| "))
    assert table.count("**") == 2 * 2  # one bold cell per metric
    assert "16,384" in row("OPPU")
    assert "### Ablation" in md and "### Sensitivity: BM25 pre-filter k" in md and "| all |" in md
    assert "### Users: drifting" in md
    assert "Incomplete run" not in md
    write_report(dict(_metrics(), pending=["lambda0", "no-pq"]), tmp_path / "partial")
    assert "**Incomplete run:** stopped before lambda0, no-pq" in (tmp_path / "partial" / "report.md").read_text()


def test_lower_is_better_for_errors():
    assert ranks({"a": 0.5, "b": 0.3, "c": 0.9}, "rmse") == {"a": 2, "b": 1, "c": 3}
    assert ranks({"a": 0.5, "b": 0.5}, "accuracy") == {}  # a tie everywhere marks nothing
    m = {"task": "LaMP_3", "variants": {"base": {"mae": 0.5, "rmse": 0.8}, "tap-per": {"mae": 0.4, "rmse": 0.9}}}
    table = markdown_table(["base", "tap-per"], m, ["mae", "rmse"])
    assert "| TAP-PER (full) | **0.4000** | <u>0.9000</u> |" in table and "mae ↓" in table


def test_report_refuses_a_file_that_is_not_a_metrics_file_naming_the_field(tmp_path, capsys):
    from tapper.cli import main

    bad = dict(_metrics())
    del bad["stage1"]
    bad["variants"]["base"]["accuracy"] = "0.4"
    (tmp_path / "m.json").write_text(json.dumps(bad))
    assert main(["report", "--metrics", str(tmp_path / "m.json"), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'm.json'}: missing field(s) ['stage1']" in err
    bad["stage1"] = {}
    (tmp_path / "m.json").write_text(json.dumps(bad))
    assert main(["report", "--metrics", str(tmp_path / "m.json"), "--out", str(tmp_path / "rep")]) == 2
    assert "field 'variants.base': metrics ['accuracy'] are not numbers" in capsys.readouterr().err


def test_report_over_several_tasks_and_cli(tmp_path):
    a, b = _metrics("LaMP_2N"), _metrics("LaMP_3")
    b["variants"] = {k: {"mae": v["accuracy"], "rmse": v["f1"] + 0.5} for k, v in a["variants"].items()}
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    from tapper.cli import main

    assert main(["report", "--metrics", str(pa), "--metrics", str(pb), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    table = md.split("## All tasks")[1].split("##")[0]
    assert "| LaMP_3 | mae ↓ | **0.4000** |" in table  # base has the lowest MAE
    assert (tmp_path / "rep" / "LaMP_3_comparison.png").exists()


def test_attention_case_study_heatmap(backbone, data, tmp_path):
    train, evals, users = data
    bb = load_backbone_dir(backbone.path)
    model = TapPer(bb.model, users, Stage2Config(lambda_init=2.0))
    encoder = encoder_for(model, TASK, bb.tokenizer, embedding_cache(bb, tmp_path / "cache"))
    study = case_study(model, encoder, TASK, evals[0])
    rows = list(study["rows"].values())
    assert len(rows) == 2 and all(len(r) == len(evals[0].history) for r in rows)
    assert all(abs(sum(r) - 1) < 1e-5 for r in rows)
    # The temporal bias favours recent records: the latest record gains weight when the bias is on.
    assert rows[0][-1] > rows[1][-1]
    assert model.cfg.use_lambda_t and model.cfg.use_lambda_o  # switched back on after the block
    with temporal_bias_off(model):
        assert float(model.prefix.lambda_t) == 0.0
    png = plot_case_study(study, tmp_path / "attention.png")
    assert png.stat().st_size > 1000 and len(study["labels"]) == len(evals[0].history)
    # Over many queries: the bias moves weight onto the most recent records, never above 1.
    over = summaries(model, encoder, evals)
    on, off = over["with temporal bias"], over["same weights, λ_t=λ_o=0"]
    assert on["queries"] == off["queries"] == sum(1 for e in evals if e.history)
    assert off["mean_alpha_last5"] <= on["mean_alpha_last5"] <= 1.0 + 1e-6
    if any(len(e.history) > 5 for e in evals):
        assert off["mean_alpha_last5"] < on["mean_alpha_last5"]
    assert 0 < on["mean_max_alpha"] <= 1.0 + 1e-6


def test_report_names_two_runs_of_one_task_and_refuses_them_unnamed(tmp_path, capsys):
    """News LaMP-2N and the synthetic data are both LaMP_2N: unnamed they would overwrite each other's plots."""
    from tapper.cli import main

    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(_metrics("LaMP_2N")))
    pb.write_text(json.dumps(_metrics("LaMP_2N")))
    assert main(["report", "--metrics", str(pa), "--metrics", str(pb), "--out", str(tmp_path / "bad")]) != 0
    assert "name each one" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "report.md").exists()
    assert (
        main(["report", "--metrics", f"news={pa}", "--metrics", f"synthetic={pb}", "--out", str(tmp_path / "rep")]) == 0
    )
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## news: LaMP_2N" in md and "## synthetic: LaMP_2N" in md
    table = md.split("## All tasks")[1].split("##")[0]
    assert "| news | accuracy ↑ |" in table and "| synthetic | accuracy ↑ |" in table
    assert (tmp_path / "rep" / "news_comparison.png").exists() and (
        tmp_path / "rep" / "synthetic_comparison.png"
    ).exists()


def test_attention_cli_on_a_real_experiment_run(tmp_path, capsys):
    """`tapper attention` on a `tapper experiment` output dir: both variants' attention, the files, a summary line
    each."""
    from tapper.cli import main
    from workflow_data import make_lamp_2n

    q, o = make_lamp_2n(tmp_path / "data", users=5, records=4, queries=1)
    run = tmp_path / "run"
    assert (
        main(
            [
                "experiment",
                "--questions",
                str(q),
                "--outputs",
                str(o),
                "--out",
                str(run),
                "--stage2-users",
                "2",
                "--variants",
                "tap-per,lambda0",
                "--no-progress",
                "--set",
                "stage1.epochs=1",
                "--set",
                "stage1.max_examples=16",
                "--set",
                "stage2.epochs=1",
                "--set",
                "eval.max_new_tokens=3",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    # Full TAP-PER against the ablation on the same queries, with a paired-bootstrap interval, saved and printed.
    metrics = json.loads((run / "metrics.json").read_text())
    pair = metrics["paired"]["pairs"]["tap-per - lambda0"]["all"]
    assert metrics["paired"]["metric"] == "accuracy" and pair["queries"] == 2
    assert pair["ci95"][0] <= pair["mean"] <= pair["ci95"][1]
    assert pair["mean"] == metrics["variants"]["tap-per"]["accuracy"] - metrics["variants"]["lambda0"]["accuracy"]
    assert "tap-per - lambda0: all " in out
    assert main(["attention", "--run", str(run), "--questions", str(q), "--outputs", str(o)]) == 0
    printed = capsys.readouterr().out.splitlines()
    study = json.loads((run / "report" / "attention.json").read_text())
    assert (run / "report" / "attention.png").stat().st_size > 0
    assert set(study["predictions"]) == {"tap-per", "lambda0"}
    summary_lines = [line for line in printed if ":" in line and "=" in line]
    assert len(summary_lines) == len(study["over_all_queries"]) >= 2
    assert printed[-2:] == [str(run / "report" / "attention.png"), str(run / "report" / "attention.json")]
