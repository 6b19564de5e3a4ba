"""Data quality of LaMP input files with Great Expectations 1.x (used directly; ZenML's GX
integration needs GX < 1.0).

The raw files are flattened into four tables — files, queries, profile records,
golds — and checked against one expectation suite per table, built for the
task (required fields, non-null, unique ids, labels in the task's label set,
dates parse, profiles chronological, history lengths within bounds, every
query has a gold). The result is a `QualityResult`: pass/fail, the failed
expectations in words, summary numbers, and a self-contained HTML page made
from GX's Data Docs.
"""
from __future__ import annotations

import html
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from materializers.types import LampFiles


@dataclass
class QualityResult:
    task: str
    success: bool
    failures: list[str]
    summary: dict[str, Any]
    html: str
    expectations: list[dict] = field(default_factory=list)

    def message(self) -> str:
        head = f"data validation failed for {self.task}: {len(self.failures)} expectation(s) not met"
        return head + "".join(f"\n  - {f}" for f in self.failures)


# --- flattening ------------------------------------------------------------------------------

def _load_json(blob: bytes, name: str) -> tuple[Any, str | None]:
    try:
        return json.loads(blob.decode("utf-8")), None
    except UnicodeDecodeError as err:
        return None, f"{name}: not UTF-8 text ({err})"
    except json.JSONDecodeError as err:
        return None, f"{name}: not valid JSON ({err})"


def resolve_task(files: LampFiles) -> str:
    """The task: --task if given, else the outputs file's "task" (canonical name)."""
    from tapper.data import canonical_task_name

    if files.task:
        return canonical_task_name(files.task)
    outputs, _ = _load_json(files.outputs_bytes, files.outputs_name)
    name = outputs.get("task") if isinstance(outputs, dict) else None
    if not isinstance(name, str):
        raise ValueError(f"{files.outputs_name}: no task given and the outputs file names none; pass --task")
    return canonical_task_name(name)


def flatten(files: LampFiles, task: str) -> dict[str, list[dict]]:
    """Tables of the raw files; structural problems become rows that fail expectations, not exceptions."""
    from tapper.data import get_task
    from tapper.data.chronology import first_out_of_order, parse_lamp_date, sort_chronologically
    from tapper.data.types import Record

    spec = get_task(task)
    questions, q_err = _load_json(files.questions_bytes, files.questions_name)
    outputs, o_err = _load_json(files.outputs_bytes, files.outputs_name)
    if q_err is None and not isinstance(questions, list):
        q_err = f"{files.questions_name}: top level must be a JSON list of questions, got {type(questions).__name__}"
    if o_err is None and not (isinstance(outputs, dict) and isinstance(outputs.get("golds"), list)):
        o_err = f'{files.outputs_name}: top level must be an object {{"task", "golds": [...]}}'
    tables: dict[str, list[dict]] = {
        "files": [
            {"file": files.questions_name, "role": "questions", "parsed": q_err is None, "problem": q_err or ""},
            {"file": files.outputs_name, "role": "outputs", "parsed": o_err is None, "problem": o_err or ""},
        ],
        "queries": [], "records": [], "golds": [],
    }
    golds: dict[str, Any] = {}
    if o_err is None:
        for i, g in enumerate(outputs["golds"]):
            g = g if isinstance(g, dict) else {}
            gid = None if g.get("id") is None else str(g.get("id"))
            out = g.get("output")
            tables["golds"].append({"id": gid, "output": out if isinstance(out, str) else None})
            if gid is not None:
                golds.setdefault(gid, out if isinstance(out, str) else None)
    if q_err is None:
        qids = set()
        for i, q in enumerate(questions):
            q = q if isinstance(q, dict) else {}
            qid = None if q.get("id") is None else str(q.get("id"))
            qids.add(qid)
            profile = q.get("profile") if isinstance(q.get("profile"), list) else None
            user = q.get("user_id", q.get("id"))
            tables["queries"].append({
                "id": qid, "input": q.get("input") if isinstance(q.get("input"), str) else None,
                "user_id": None if user is None else str(user),
                "profile_len": len(profile) if profile is not None else None,
                "has_gold": qid in golds, "gold": golds.get(qid),
            })
            parsed: list[Record] = []
            rows = []
            for j, r in enumerate(profile or []):
                r = r if isinstance(r, dict) else {}
                rid = None if r.get("id") is None else str(r.get("id"))
                try:
                    date = parse_lamp_date(r.get("date"))
                    date_ok = True
                except ValueError:
                    date, date_ok = None, False
                row = {"query_id": qid, "record_id": rid, "date": None if r.get("date") is None else str(r.get("date")),
                       "date_ok": date_ok, "chronological": True}
                for name in spec.profile_fields:
                    v = r.get(name)
                    row[f"field_{name}"] = str(v) if isinstance(v, (str, int, float)) and not isinstance(v, bool) else None
                rows.append(row)
                parsed.append(Record(id=str(j), fields={}, date=date))
            # The loader sorts each profile by date; the order it yields must then be chronological.
            ordered = sort_chronologically(parsed)
            bad = first_out_of_order(ordered)
            if bad is not None:
                rows[int(ordered[bad].id)]["chronological"] = False
            tables["records"].extend(rows)
        for row in tables["golds"]:
            row["in_questions"] = row["id"] in qids
    return tables


# --- expectations ----------------------------------------------------------------------------

def build_suites(task: str, min_history: int, max_history: int) -> dict[str, list]:
    import great_expectations as gx

    from tapper.data import get_task

    E = gx.expectations
    spec = get_task(task)
    suites: dict[str, list] = {
        "files": [E.ExpectColumnValuesToBeInSet(column="parsed", value_set=[True])],
        "queries": [
            E.ExpectTableRowCountToBeBetween(min_value=1),
            E.ExpectColumnValuesToNotBeNull(column="id"),
            E.ExpectColumnValuesToBeUnique(column="id"),
            E.ExpectColumnValuesToNotBeNull(column="input"),
            E.ExpectColumnValuesToNotBeNull(column="user_id"),
            E.ExpectColumnValuesToBeInSet(column="has_gold", value_set=[True]),
            E.ExpectColumnValuesToBeBetween(column="profile_len", min_value=min_history, max_value=max_history),
        ],
        "records": [
            E.ExpectColumnValuesToNotBeNull(column="record_id"),
            E.ExpectCompoundColumnsToBeUnique(column_list=["query_id", "record_id"]),
            E.ExpectColumnValuesToBeInSet(column="date_ok", value_set=[True]),
            E.ExpectColumnValuesToBeInSet(column="chronological", value_set=[True]),
            *[E.ExpectColumnValuesToNotBeNull(column=f"field_{name}") for name in spec.profile_fields],
        ],
        "golds": [
            E.ExpectColumnValuesToNotBeNull(column="id"),
            E.ExpectColumnValuesToBeUnique(column="id"),
            E.ExpectColumnValuesToNotBeNull(column="output"),
        ],
    }
    if spec.labels is not None:
        suites["queries"].append(E.ExpectColumnValuesToBeInSet(column="gold", value_set=list(spec.labels)))
        suites["golds"].append(E.ExpectColumnValuesToBeInSet(column="output", value_set=list(spec.labels)))
        if spec.target_field is not None:
            suites["records"].append(E.ExpectColumnValuesToBeInSet(column=f"field_{spec.target_field}", value_set=list(spec.labels)))
    return suites


_COLUMNS = {
    "files": ["file", "role", "parsed", "problem"],
    "queries": ["id", "input", "user_id", "profile_len", "has_gold", "gold"],
    "records": ["query_id", "record_id", "date", "date_ok", "chronological"],
    "golds": ["id", "output", "in_questions"],
}


def _frame(name: str, rows: list[dict], task: str):
    import pandas as pd

    from tapper.data import get_task

    cols = list(_COLUMNS[name])
    if name == "records":
        cols += [f"field_{n}" for n in get_task(task).profile_fields]
    df = pd.DataFrame(rows, columns=cols)
    return df.astype(object).where(df.notna(), None)


def describe_failure(table: str, res) -> str:
    cfg = res.expectation_config
    kw = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id", "result_format")}
    what = cfg.type.replace("expect_", "").replace("_", " ")
    col = kw.pop("column", None) or kw.pop("column_list", None)
    r = res.result or {}
    bad = r.get("partial_unexpected_list") or []
    count = r.get("unexpected_count")
    detail = []
    if col is not None:
        detail.append(f"column {col}")
    if count:
        detail.append(f"{count} unexpected")
    if bad:
        detail.append("e.g. " + ", ".join(repr(b) for b in bad[:3]))
    if r.get("observed_value") is not None:
        detail.append(f"observed {r['observed_value']!r}")
    extra = {k: v for k, v in kw.items() if k in ("value_set", "min_value", "max_value") and v is not None}
    if "value_set" in extra and len(extra["value_set"]) > 6:
        extra["value_set"] = f"<{len(extra['value_set'])} labels>"
    return f"{table}: {what} ({'; '.join(detail)})" + (f" {extra}" if extra else "")


def validate_files(files: LampFiles, min_history: int = 1, max_history: int = 100_000) -> QualityResult:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import logging

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig
    task = resolve_task(files)
    tables = flatten(files, task)
    suites = build_suites(task, min_history, max_history)
    failures: list[str] = []
    expectations: list[dict] = []
    pages: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="tapper-gx-") as root:
        ctx = gx.get_context(mode="file", project_root_dir=root)
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        source = ctx.data_sources.add_pandas("lamp")
        parsed_all = all(r["parsed"] for r in tables["files"])
        for name, exps in suites.items():
            if name != "files" and not parsed_all:
                continue  # nothing to check in the tables of a file that did not parse
            batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
            suite = ctx.suites.add(gx.ExpectationSuite(name=f"{task}.{name}", expectations=exps))
            vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=f"{task}.{name}", data=batch, suite=suite))
            cp = ctx.checkpoints.add(gx.Checkpoint(
                name=f"{task}.{name}", validation_definitions=[vd],
                actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")],
                result_format={"result_format": "SUMMARY"},
            ))
            run = cp.run(batch_parameters={"dataframe": _frame(name, tables[name], task)})
            for vr in run.run_results.values():
                for res in vr.results:
                    ok = bool(res.success)
                    expectations.append({"table": name, "expectation": res.expectation_config.type,
                                         "column": res.expectation_config.kwargs.get("column"), "success": ok})
                    if not ok:
                        failures.append(describe_failure(name, res))
        for row in tables["files"]:
            if not row["parsed"]:
                failures.append(row["problem"])
        site = Path(root) / "gx" / "uncommitted" / "data_docs" / "local_site"
        for page in sorted((site / "validations").rglob("*.html")) if site.exists() else []:
            pages.append((page.relative_to(site / "validations").parts[0], _inline_css(page.read_text(), site)))
    summary = {
        "task": task, "success": not failures, "expectations": len(expectations),
        "failed_expectations": sum(not e["success"] for e in expectations) + sum(not r["parsed"] for r in tables["files"]),
        "queries": len(tables["queries"]), "records": len(tables["records"]), "golds": len(tables["golds"]),
        "users": len({q["user_id"] for q in tables["queries"]}),
        "questions_sha256": files.questions_sha256, "outputs_sha256": files.outputs_sha256,
    }
    return QualityResult(task=task, success=not failures, failures=failures, summary=summary,
                         html=report_html(task, files, summary, failures, expectations, pages), expectations=expectations)


def _inline_css(page: str, site: Path) -> str:
    """GX pages link their CSS relative to the site; inline what exists so the page stands alone."""
    def repl(m: re.Match) -> str:
        href = m.group(1)
        local = site / re.sub(r"^(\.\./)+", "", href)
        if local.exists():
            return f"<style>{local.read_text()}</style>"
        return m.group(0)

    return re.sub(r'<link[^>]+href="([^"]+\.css)"[^>]*>', repl, page)


def report_html(task, files, summary, failures, expectations, pages) -> str:
    ok = not failures
    color = "#1a7f37" if ok else "#cf222e"
    rows = "".join(
        f"<tr><td>{html.escape(e['table'])}</td><td>{html.escape(e['expectation'])}</td>"
        f"<td>{html.escape(str(e['column'] or ''))}</td><td style='color:{'#1a7f37' if e['success'] else '#cf222e'}'>"
        f"{'pass' if e['success'] else 'FAIL'}</td></tr>" for e in expectations)
    fails = "".join(f"<li>{html.escape(f)}</li>" for f in failures)
    frames = "".join(
        f"<h3>GX Data Docs: {html.escape(name)}</h3><iframe style='width:100%;height:700px;border:1px solid #ccc' "
        f"srcdoc=\"{html.escape(page, quote=True)}\"></iframe>" for name, page in pages)
    nums = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in summary.items())
    return (
        "<html><head><meta charset='utf-8'><title>tapper data quality</title></head><body style='font-family:sans-serif'>"
        f"<h2>Data quality: {html.escape(task)} — <span style='color:{color}'>{'PASSED' if ok else 'FAILED'}</span></h2>"
        f"<p>questions: <code>{html.escape(files.questions_name)}</code><br>outputs: <code>{html.escape(files.outputs_name)}</code></p>"
        + (f"<h3>What failed</h3><ul>{fails}</ul>" if fails else "")
        + f"<h3>Summary</h3><table border='1' cellpadding='4' style='border-collapse:collapse'>{nums}</table>"
        + f"<h3>Expectations</h3><table border='1' cellpadding='4' style='border-collapse:collapse'>"
          f"<tr><th>table</th><th>expectation</th><th>column</th><th>result</th></tr>{rows}</table>"
        + frames + "</body></html>"
    )
