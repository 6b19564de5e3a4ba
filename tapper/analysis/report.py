"""Comparison report from `metrics.json`: Markdown tables (best per metric in bold) and PNG plots.

    write_report(metrics, out_dir) -> [report.md, *.png]

`metrics` is one experiment's metrics.json (tapper.experiment's contract) or
a list of them (one per task: the paper's Table-1 layout, task x metric rows
by method columns, is added). Sections, each only when its variants ran:

- comparison: base, RAG (k), PAG (k), OPPU (base/+rag/+pag), P_q-only, TAP-PER,
  with the per-user parameters each stores; best per metric **bold**, second <u>underlined</u>;
- ablation: Full, -bridge, -P_q, -P_u, λ_t=0, λ_o=0, both 0;
- sensitivity: BM25 pre-filter k and prefix length L (with the full model as "all" / its L);
- user groups (e.g. drifting vs stable users of the synthetic data);
- footprint / timing plots, when those JSON results are passed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

LOWER_IS_BETTER = {"mae", "rmse"}
COMPARISON_ORDER = [
    "base",
    "rag-k1",
    "rag-k2",
    "rag-k4",
    "pag-k0",
    "pag-k1",
    "oppu",
    "oppu-rag",
    "oppu-pag",
    "pq-only",
    "tap-per",
]
ABLATION_ORDER = ["tap-per", "no-bridge", "no-pq", "no-pu", "lambda-t0", "lambda-o0", "lambda0", "base"]
LABELS = {
    "base": "Base (Stage 1)",
    "pq-only": "TAP-PER P_q-only",
    "tap-per": "TAP-PER (full)",
    "no-bridge": "-bridge",
    "no-pq": "-P_q",
    "no-pu": "-P_u",
    "lambda-t0": "λ_t=0",
    "lambda-o0": "λ_o=0",
    "lambda0": "λ_t=λ_o=0",
    "oppu": "OPPU",
    "oppu-rag": "OPPU +rag",
    "oppu-pag": "OPPU +pag",
}


def section_name(metrics: dict) -> str:
    """What a task's section is called: the name given on the command line (`NAME=metrics.json`), else the task."""
    return metrics.get("name") or metrics["task"]


def label(variant: str) -> str:
    if variant in LABELS:
        return LABELS[variant]
    m = re.fullmatch(r"(rag|pag)-k(\d+)", variant)
    if m:
        return f"{m.group(1).upper()} k={m.group(2)}"
    return variant


def higher_is_better(metric: str) -> bool:
    return metric.lower() not in LOWER_IS_BETTER


def arrow(metric: str) -> str:
    return "↑" if higher_is_better(metric) else "↓"


def ranks(values: dict[str, float], metric: str) -> dict[str, int]:
    """1 for the best value(s), 2 for the second best (ties share a rank)."""
    distinct = sorted({v for v in values.values() if v is not None}, reverse=higher_is_better(metric))
    if len(distinct) < 2:
        return {}  # all equal: nothing is best
    return {k: distinct.index(v) + 1 for k, v in values.items() if v is not None}


def fmt(value: float | None, rank: int | None = None) -> str:
    if value is None:
        return "–"
    text = f"{value:.4f}"
    if rank == 1:
        return f"**{text}**"
    if rank == 2:
        return f"<u>{text}</u>"
    return text


def metric_names(metrics: dict) -> list[str]:
    for vals in metrics["variants"].values():
        return list(vals)
    return []


def _ordered(names, order) -> list[str]:
    return [n for n in order if n in names]


def markdown_table(
    rows: list[str], metrics: dict, columns: list[str], extra: dict[str, list[str]] | None = None, mark: bool = True
) -> str:
    """Variants as rows, metrics as columns; best per metric in bold, second underlined."""
    variants = metrics["variants"]
    head = ["method"] + [f"{m} {arrow(m)}" for m in columns] + list((extra or {}).keys())
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    rank = {m: ranks({r: variants[r].get(m) for r in rows}, m) if mark and len(rows) > 1 else {} for m in columns}
    for i, r in enumerate(rows):
        cells = [label(r)] + [fmt(variants[r].get(m), rank[m].get(r)) for m in columns]
        cells += [vals[i] for vals in (extra or {}).values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _params(metrics: dict, names: list[str]) -> list[str]:
    params = metrics.get("params", {})
    return [f"{params.get(n, {}).get('per_user', 0):,}" for n in names]


def _seconds(metrics: dict, names: list[str]) -> list[str]:
    det = metrics.get("details", {})
    return [f"{det[n]['seconds']:.0f}" if n in det and "seconds" in det[n] else "–" for n in names]


def sensitivity(metrics: dict, kind: str) -> list[tuple[str, str]]:
    """[(x label, variant)] for the BM25 pre-filter (`bm25`) or prefix length (`L`) sweep, sorted by x."""
    names = list(metrics["variants"])
    cfg = metrics.get("config", {}).get("stage2", {})
    pts = []
    for n in names:
        m = re.fullmatch(r"bm25-k(\d+)" if kind == "bm25" else r"L-?(\d+)", n)
        if m:
            pts.append((int(m.group(1)), str(int(m.group(1))), n))
    if pts and "tap-per" in names:
        if kind == "bm25":
            pts.append((10**9, "all", "tap-per"))
        elif cfg.get("prefix_len") and all(p[0] != cfg["prefix_len"] for p in pts):
            pts.append((int(cfg["prefix_len"]), str(cfg["prefix_len"]), "tap-per"))
    return [(x, v) for _, x, v in sorted(pts)]


# --- plots --------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bars(metrics: dict, names: list[str], path: Path, title: str) -> Path:
    plt = _plt()
    cols = metric_names(metrics)
    fig, axes = plt.subplots(1, len(cols), figsize=(max(4.0, 0.55 * len(names) + 1.5) * len(cols), 3.8), squeeze=False)
    for ax, m in zip(axes[0], cols):
        vals = [metrics["variants"][n].get(m) or 0.0 for n in names]
        best = (max if higher_is_better(m) else min)(vals) if vals else None
        colors = [
            "tab:red" if n in ("tap-per", "pq-only") else "tab:gray" if n == "base" else "tab:blue" for n in names
        ]
        bars = ax.bar(range(len(names)), vals, color=colors)
        for b, v in zip(bars, vals):
            if v == best:
                b.set_edgecolor("black")
                b.set_linewidth(2)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([label(n) for n in names], rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{m} {arrow(m)}")
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sensitivity(metrics: dict, path: Path) -> Path | None:
    sweeps = {k: sensitivity(metrics, k) for k in ("bm25", "L")}
    sweeps = {k: v for k, v in sweeps.items() if len(v) > 1}
    if not sweeps:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(sweeps), figsize=(5 * len(sweeps), 3.6), squeeze=False)
    for ax, (kind, pts) in zip(axes[0], sweeps.items()):
        for m, style in zip(metric_names(metrics), ("o-", "s--")):
            ax.plot(range(len(pts)), [metrics["variants"][v].get(m) for _, v in pts], style, label=f"{m} {arrow(m)}")
        ax.set_xticks(range(len(pts)))
        ax.set_xticklabels([x for x, _ in pts])
        ax.set_xlabel("BM25 pre-filter k" if kind == "bm25" else "prefix length L")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{section_name(metrics)}: sensitivity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_losses(metrics: dict, path: Path) -> Path | None:
    curves = {k: d["losses"] for k, d in metrics.get("details", {}).items() if len(d.get("losses") or []) > 1}
    if not curves:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for k, ls in curves.items():
        ax.plot(range(1, len(ls) + 1), ls, marker=".", label=label(k))
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_title(f"{section_name(metrics)}: Stage-2 / baseline training loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- the report ---------------------------------------------------------------------------


def task_section(metrics: dict, out_dir: Path, stem: str) -> tuple[list[str], list[Path]]:
    names = list(metrics["variants"])
    cols = metric_names(metrics)
    md, files = [], []
    d = metrics.get("data", {})
    head = (
        metrics["task"] if section_name(metrics) == metrics["task"] else f"{section_name(metrics)}: {metrics['task']}"
    )
    md.append(f"## {head} ({metrics.get('backbone', '?')} backbone)\n")
    if d:
        md.append(
            f"Users: {d.get('users')} ({d.get('stage1_users')} Stage 1, {d.get('stage2_users')} Stage 2 / evaluated); "
            f"Stage-2 examples: {d.get('stage2_examples')}; evaluation queries: {d.get('eval_queries')}. "
            f"Run time: {metrics.get('seconds', '?')} s.\n"
        )
    if metrics.get("pending"):
        # A run stopped midway keeps the metrics of what it finished (tapper experiment rewrites
        # metrics.json after each variant); say so rather than present a partial table as complete.
        md.append(
            f"**Incomplete run:** stopped before {', '.join(metrics['pending'])}; only the finished variants are "
            "shown.\n"
        )
    comp = _ordered(names, COMPARISON_ORDER) + [
        n
        for n in names
        if n not in COMPARISON_ORDER
        and n not in ABLATION_ORDER
        and not re.fullmatch(r"bm25-k\d+|L-?\d+|rag-k\d+|pag-k\d+", n)
    ]
    comp += sorted((n for n in names if re.fullmatch(r"(rag|pag)-k\d+", n) and n not in COMPARISON_ORDER))
    if comp:
        md.append("### Comparison (same backbone, same split)\n")
        md.append(
            markdown_table(
                comp, metrics, cols, {"per-user params": _params(metrics, comp), "seconds": _seconds(metrics, comp)}
            )
        )
        md.append(
            "\n**Bold**: best per metric; <u>underlined</u>: second best. Per-user params: parameters stored per user "
            "(0 for prompt-based methods, which store text).\n"
        )
        files.append(
            plot_bars(metrics, comp, out_dir / f"{stem}comparison.png", f"{section_name(metrics)}: comparison")
        )
        md.append(f"![comparison]({files[-1].name})\n")
    abl = _ordered(names, ABLATION_ORDER)
    if len([a for a in abl if a not in ("tap-per", "base")]) >= 1:
        md.append("### Ablation\n")
        md.append(markdown_table(abl, metrics, cols, {"per-user params": _params(metrics, abl)}))
        lam = {
            k: (v.get("lambda_t"), v.get("lambda_o")) for k, v in metrics.get("details", {}).items() if "lambda_t" in v
        }
        if lam:
            md.append(
                "\nLearned temporal coefficients: "
                + "; ".join(f"{label(k)} λ_t={t:.3f}, λ_o={o:.3f}" for k, (t, o) in lam.items() if t is not None)
                + "\n"
            )
        files.append(plot_bars(metrics, abl, out_dir / f"{stem}ablation.png", f"{section_name(metrics)}: ablation"))
        md.append(f"![ablation]({files[-1].name})\n")
    for kind, heading in (("bm25", "BM25 pre-filter k"), ("L", "Prefix length L")):
        pts = sensitivity(metrics, kind)
        if len(pts) > 1:
            md.append(f"### Sensitivity: {heading}\n")
            sub = {"task": metrics["task"], "variants": {x: metrics["variants"][v] for x, v in pts}}
            md.append(markdown_table([x for x, _ in pts], sub, cols).replace("| method", f"| {kind}"))
            md.append("")
    p = plot_sensitivity(metrics, out_dir / f"{stem}sensitivity.png")
    if p:
        files.append(p)
        md.append(f"![sensitivity]({p.name})\n")
    groups = metrics.get("groups") or {}
    gnames = sorted({g for v in groups.values() for g in v})
    for g in gnames:
        rows = [n for n in names if g in groups.get(n, {})]
        sub = {"task": metrics["task"], "variants": {n: {m: groups[n][g].get(m) for m in cols} for n in rows}}
        md.append(f"### Users: {g} (n = {groups[rows[0]][g].get('n', '?')} queries)\n")
        md.append(markdown_table(rows, sub, cols))
        md.append("")
    p = plot_losses(metrics, out_dir / f"{stem}losses.png")
    if p:
        files.append(p)
        md.append(f"![losses]({p.name})\n")
    return md, files


def combined_table(all_metrics: list[dict]) -> str:
    """The paper's Table-1 layout: task x metric rows, methods as columns, best per row in bold."""
    methods = [m for m in COMPARISON_ORDER if any(m in mt["variants"] for mt in all_metrics)]
    head = ["task", "metric"] + [label(m) for m in methods]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---", "---"] + ["---:"] * len(methods)) + "|"]
    for mt in all_metrics:
        for metric in metric_names(mt):
            vals = {m: mt["variants"].get(m, {}).get(metric) for m in methods}
            rk = ranks(vals, metric)
            lines.append(
                "| "
                + " | ".join(
                    [section_name(mt), f"{metric} {arrow(metric)}"] + [fmt(vals[m], rk.get(m)) for m in methods]
                )
                + " |"
            )
    return "\n".join(lines)


def write_report(
    metrics: dict | list[dict],
    out_dir: str | Path,
    footprint: dict | list | None = None,
    timing: dict | list | None = None,
    title: str = "TAP-PER: comparison report",
) -> list[Path]:
    """Write `report.md` and its PNGs into `out_dir`; returns [report.md, *pngs]."""
    from tapper.atomic import atomic_write_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    all_metrics = metrics if isinstance(metrics, list) else [metrics]
    md = [f"# {title}\n"]
    files: list[Path] = []
    if len(all_metrics) > 1:
        md.append("## All tasks (Table-1 layout)\n")
        md.append(combined_table(all_metrics))
        md.append("\n**Bold**: best per row; <u>underlined</u>: second best.\n")
    stems = [
        "" if len(all_metrics) == 1 else re.sub(r"[^A-Za-z0-9]+", "_", section_name(mt)).strip("_") + "_"
        for mt in all_metrics
    ]
    if len(set(stems)) < len(stems):
        # Two runs of one task (e.g. News LaMP-2N and the synthetic data, both LaMP_2N) would overwrite
        # each other's plots and share a heading.
        raise ValueError(
            f"report: several metrics files are called {[section_name(m) for m in all_metrics]}; "
            "name each one, e.g. `--metrics news=runs/a/metrics.json --metrics synthetic=runs/b/metrics.json`"
        )
    for mt, stem in zip(all_metrics, stems):
        sec, f = task_section(mt, out_dir, stem)
        md += sec
        files += f
    if footprint:
        from tapper.analysis.footprint import plot_footprint

        fps = footprint if isinstance(footprint, list) else [footprint]
        md.append("## Parameter footprint\n")
        md.append(
            "| backbone | method | per user | shared | total @1k users | total @1M users "
            "|\n|---|---|---:|---:|---:|---:|"
        )
        for fp in fps:
            for name, m in fp["methods"].items():
                at = dict(zip(fp["users"], m["total"]))
                md.append(
                    f"| {fp['backbone']} | {name} | {m['per_user']:,} | {m['shared']:,} | {at.get(1000, 0):,} | "
                    f"{at.get(1_000_000, 0):,} |"
                )
        files.append(plot_footprint(fps, out_dir / "footprint.png"))
        md.append(f"\n![footprint]({files[-1].name})\n")
    if timing:
        from tapper.analysis.timing import plot_timing

        tms = timing if isinstance(timing, list) else [timing]
        md.append("## Per-user training time\n")
        md.append("| backbone | history | OPPU s | TAP-PER (P_u) s | P_q-only s |\n|---|---:|---:|---:|---:|")
        for tm in tms:
            for r in tm["rows"]:
                md.append(
                    f"| {tm['backbone']} | {r['history']} | {r['oppu_s']:.3f} | {r['tapper_s']:.3f} | "
                    f"{r['pq_only_s']:.1f} |"
                )
        files.append(plot_timing(tms, out_dir / "train_time.png"))
        md.append(f"\n![train time]({files[-1].name})\n")
    report = atomic_write_text(out_dir / "report.md", "\n".join(md) + "\n")
    return [report, *files]


def load_json(path: str | Path):
    return json.loads(Path(path).read_text())
