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
        head = f"data validation failed for {self.task}: {len(self.failures)} problem(s)"
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
        "queries": [],
        "records": [],
        "golds": [],
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
            tables["queries"].append(
                {
                    "id": qid,
                    "input": q.get("input") if isinstance(q.get("input"), str) else None,
                    "user_id": None if user is None else str(user),
                    "profile_len": len(profile) if profile is not None else None,
                    "has_gold": qid in golds,
                    "gold": golds.get(qid),
                }
            )
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
                row = {
                    "query_id": qid,
                    "record_id": rid,
                    "date": None if r.get("date") is None else str(r.get("date")),
                    "date_ok": date_ok,
                    "chronological": True,
                }
                for name in spec.profile_fields:
                    v = r.get(name)
                    row[f"field_{name}"] = (
                        str(v) if isinstance(v, (str, int, float)) and not isinstance(v, bool) else None
                    )
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
            suites["records"].append(
                E.ExpectColumnValuesToBeInSet(column=f"field_{spec.target_field}", value_set=list(spec.labels))
            )
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


# What each check means for the files, in words (table, expectation type, column) -> what the failing rows have.
_PLAIN: dict[tuple[str, str, str | None], str] = {
    ("queries", "expect_table_row_count_to_be_between", None): "the questions file holds no questions",
    ("queries", "expect_column_values_to_not_be_null", "id"): "question(s) without an id",
    ("queries", "expect_column_values_to_be_unique", "id"): "question(s) share an id with another question",
    ("queries", "expect_column_values_to_not_be_null", "input"): "question(s) without an input text",
    ("queries", "expect_column_values_to_not_be_null", "user_id"): "question(s) without a user_id",
    ("queries", "expect_column_values_to_be_in_set", "has_gold"): "question(s) have no gold answer in the outputs file",
    (
        "queries",
        "expect_column_values_to_be_between",
        "profile_len",
    ): "question(s) have a history (profile) of {bounds} records",
    (
        "queries",
        "expect_column_values_to_be_in_set",
        "gold",
    ): "question(s) have a gold answer that is not a {task} label",
    ("records", "expect_column_values_to_not_be_null", "record_id"): "history record(s) without an id",
    (
        "records",
        "expect_compound_columns_to_be_unique",
        None,
    ): "history record(s) repeat a record id within one question's profile",
    ("records", "expect_column_values_to_be_in_set", "date_ok"): "history record(s) have a date that does not parse",
    (
        "records",
        "expect_column_values_to_be_in_set",
        "chronological",
    ): "question(s) have a profile whose dates go backwards",
    ("golds", "expect_column_values_to_not_be_null", "id"): "gold(s) without an id",
    ("golds", "expect_column_values_to_be_unique", "id"): "gold(s) share an id with another gold",
    ("golds", "expect_column_values_to_not_be_null", "output"): "gold(s) without an output",
    ("golds", "expect_column_values_to_be_in_set", "output"): "gold output(s) that are not a {task} label",
}
# Which column of a failing row to quote as the example (the value itself is often just True/False).
_SHOW = {"has_gold": "id", "date_ok": "date", "chronological": "query_id", "profile_len": "id"}
_FILE_OF = {"queries": "questions", "records": "questions", "golds": "outputs"}


def describe_failure(
    table: str, res, rows: list[dict] | None = None, files: LampFiles | None = None, task: str = ""
) -> str:
    """One failed expectation in words: which file, how many rows, what is wrong with them, examples.

    e.g. "questions.json: 1 history record(s) have a date that does not parse (e.g. '2020-13-45' in record 'r0'
    of question 'q1-0')" — the expectation's own name is kept in brackets for the report's table."""
    cfg = res.expectation_config
    kw = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id", "result_format")}
    col = kw.get("column")
    r = res.result or {}
    count = r.get("unexpected_count")
    key = (table, cfg.type, col if isinstance(col, str) else None)
    what = _PLAIN.get(key)
    if what is None and isinstance(col, str) and col.startswith("field_"):
        field = col[len("field_") :]
        what = (
            f"history record(s) have a {field!r} that is not a {task} label"
            if cfg.type == "expect_column_values_to_be_in_set"
            else f"history record(s) lack the field {field!r}"
        )
    lo, hi = kw.get("min_value"), kw.get("max_value")
    bounds = (
        (f"fewer than {lo:g}" if lo is not None else "")
        + (" or " if lo is not None and hi is not None else "")
        + (f"more than {hi:g}" if hi is not None else "")
    )
    what = (what or cfg.type.replace("expect_", "").replace("_", " ")).format(task=task, bounds=bounds)
    examples: list[str] = []
    indices = r.get("partial_unexpected_index_list") or []
    if rows is not None and indices:
        show = _SHOW.get(col, col) if isinstance(col, str) else None
        for i in indices[:3]:
            row = rows[i] if isinstance(i, int) and i < len(rows) else None
            if row is None:
                continue
            value = row.get(show) if show else None
            where = (
                f"record {row['record_id']!r} of question {row['query_id']!r}"
                if table == "records"
                else f"question {row['id']!r}"
                if table == "queries" and show != "id"
                else ""
            )
            if table == "queries" and show == "id":
                examples.append(
                    repr(row.get("id")) + (f" ({row.get('profile_len')} records)" if col == "profile_len" else "")
                )
            else:
                examples.append(" in ".join(x for x in (repr(value) if value is not None else "", where) if x))
    elif r.get("partial_unexpected_list"):
        examples = [repr(b) for b in r["partial_unexpected_list"][:3]]
    if r.get("observed_value") is not None and not count:
        examples.append(f"found {r['observed_value']!r}")
    examples = list(dict.fromkeys(examples))  # e.g. two rows sharing one id
    name = Path(getattr(files, f"{_FILE_OF.get(table, 'questions')}_name")).name if files is not None else table
    head = f"{name}: {count} {what}" if count else f"{name}: {what}"
    return head + (f" (e.g. {'; '.join(examples)})" if examples else "") + f" [{table}: {cfg.type}]"


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
            cp = ctx.checkpoints.add(
                gx.Checkpoint(
                    name=f"{task}.{name}",
                    validation_definitions=[vd],
                    actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")],
                    result_format={"result_format": "SUMMARY", "partial_unexpected_count": 3},
                )
            )
            run = cp.run(batch_parameters={"dataframe": _frame(name, tables[name], task)})
            for vr in run.run_results.values():
                for res in vr.results:
                    ok = bool(res.success)
                    expectations.append(
                        {
                            "table": name,
                            "expectation": res.expectation_config.type,
                            "column": res.expectation_config.kwargs.get("column"),
                            "success": ok,
                        }
                    )
                    if not ok and name == "files":
                        # the file did not parse: its own problem (not valid JSON, wrong top level) says it plainly
                        failures.extend(
                            f"{Path(row['file']).name}: {row['problem'].split(': ', 1)[-1]}"
                            for row in tables["files"]
                            if not row["parsed"]
                        )
                    elif not ok:
                        failures.append(describe_failure(name, res, tables[name], files, task))
        site = Path(root) / "gx" / "uncommitted" / "data_docs" / "local_site"
        for page in sorted((site / "validations").rglob("*.html")) if site.exists() else []:
            pages.append((page.relative_to(site / "validations").parts[0], _inline_css(page.read_text(), site)))
    summary = {
        "task": task,
        "success": not failures,
        "expectations": len(expectations),
        "failed_expectations": sum(not e["success"] for e in expectations),
        "queries": len(tables["queries"]),
        "records": len(tables["records"]),
        "golds": len(tables["golds"]),
        "users": len({q["user_id"] for q in tables["queries"]}),
        "questions_sha256": files.questions_sha256,
        "outputs_sha256": files.outputs_sha256,
    }
    return QualityResult(
        task=task,
        success=not failures,
        failures=failures,
        summary=summary,
        html=report_html(task, files, summary, failures, expectations, pages),
        expectations=expectations,
    )


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
        f"{'pass' if e['success'] else 'FAIL'}</td></tr>"
        for e in expectations
    )
    fails = "".join(f"<li>{html.escape(f)}</li>" for f in failures)
    frames = "".join(
        f"<h3>GX Data Docs: {html.escape(name)}</h3><iframe style='width:100%;height:700px;border:1px solid #ccc' "
        f'srcdoc="{html.escape(page, quote=True)}"></iframe>'
        for name, page in pages
    )
    nums = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in summary.items())
    return (
        "<html><head><meta charset='utf-8'><title>tapper data quality</title></head><body "
        "style='font-family:sans-serif'>"
        f"<h2>Data quality: {html.escape(task)} — <span "
        f"style='color:{color}'>{'PASSED' if ok else 'FAILED'}</span></h2>"
        f"<p>questions: <code>{html.escape(files.questions_name)}</code><br>outputs: "
        f"<code>{html.escape(files.outputs_name)}</code></p>"
        + (f"<h3>What failed</h3><ul>{fails}</ul>" if fails else "")
        + f"<h3>Summary</h3><table border='1' cellpadding='4' style='border-collapse:collapse'>{nums}</table>"
        + f"<h3>Expectations</h3><table border='1' cellpadding='4' style='border-collapse:collapse'>"
        f"<tr><th>table</th><th>expectation</th><th>column</th><th>result</th></tr>{rows}</table>"
        + frames
        + "</body></html>"
    )
