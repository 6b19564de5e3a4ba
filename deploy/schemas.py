"""Request bodies: their JSON schema (pydantic), and the checks that need the task or the configured limits.

Pydantic checks types. The rest is checked here, before any model work, and every problem names its field
(`body.records.0.category`) in the one error shape (deploy.errors):

- no text anywhere may hold a lone UTF-16 surrogate ("\\ud800" is valid JSON, but no UTF-8 can store it: it was
  a 500 when the user id or record reached a file);
- ids hold no control characters (the server's tombstones for deleted users use one, so they never collide);
- lengths: texts, ids, history and feedback sizes (deploy.config.Limits);
- record fields are strings or finite numbers (NaN and Infinity are accepted by Python's JSON parser and were
  stored as "nan");
- feedback answers are in the task's label set (an empty or unknown label was trained into the user's row),
  non-empty for generation tasks, and dated no later than today + `max_future_days` (one 9999-12-31 made every
  later feedback of that user a 409).
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from deploy.config import Limits
from deploy.errors import FieldProblem
from tapper.data.chronology import parse_lamp_date
from tapper.data.types import Record

# Hard caps in the schema itself (the configured limits are at most these in practice; the body limit bounds all).
MAX_FIELDS_PER_RECORD = 32


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _no_surrogates(v: str) -> str:
    if _has_lone_surrogate(v):
        raise ValueError("contains a lone UTF-16 surrogate (not valid Unicode text)")
    return v


def _id_text(v: Any) -> Any:
    # LaMP ids and user ids may be JSON integers; they are strings here.
    return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


def _id_checked(v: str) -> str:
    _no_surrogates(v)
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in v):
        raise ValueError("must not contain control characters")
    if not v.strip():
        raise ValueError("must not be blank")
    return v


def _date_text(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, int) and not isinstance(v, bool):
        v = str(v)
    if isinstance(v, str):
        parse_lamp_date(v)  # ValueError -> 422 at the date field
    return v


Text = Annotated[str, AfterValidator(_no_surrogates)]
IdStr = Annotated[str, BeforeValidator(_id_text), Field(min_length=1, max_length=1024), AfterValidator(_id_checked)]
DateStr = Annotated[str | None, BeforeValidator(_date_text)]


class RecordIn(BaseModel):
    """A LaMP profile item: id, optional date, and the task's fields as extra keys (e.g. text, title, category)."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": {"type": ["string", "number"]}})
    id: IdStr
    date: DateStr = Field(None, description="YYYY-MM-DD or YYYY")


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: IdStr
    input: Text | None = Field(None, min_length=1, description="the query as the task's full input text (LaMP `input`)")
    fields: dict[Text, Text] | None = Field(
        None, description="or the task's fields, e.g. {'text': ...}; the input is built from the task template"
    )
    date: DateStr = Field(None, description="query date YYYY-MM-DD (default: the latest history date)")
    history: list[RecordIn] | None = Field(
        None, description="records to use in addition to the server's history store (not stored)"
    )
    id: IdStr | None = None
    max_new_tokens: int | None = Field(None, ge=1)


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: IdStr
    records: list[RecordIn] = Field(min_length=1, description="new records, with their answers, in time order")


class CompletionRequest(BaseModel):
    """OpenAI's legacy completions request (POST /v1/completions). `user` chooses whose personalization is used."""

    model_config = ConfigDict(extra="allow")
    model: Text = Field(description="any name: the server answers with the model it serves, named in the response")
    prompt: Text | list[Text] = Field(description="the task input (a LaMP `input`); a list answers each, in order")
    user: IdStr = Field(description="the end user; tapper personalizes by it (required here, optional in OpenAI's API)")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, description="accepted; decoding is greedy")
    top_p: float | None = Field(None, ge=0, le=1, description="accepted; decoding is greedy")
    n: int = Field(1, ge=1, le=1, description="one choice per prompt")
    stream: bool = Field(False, description="streaming is not supported")
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = Field(None, ge=1, le=1)
    suffix: str | None = None
    stop: Text | list[Text] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=0, le=0, description="only 0 (greedy decoding)")
    frequency_penalty: float = Field(0.0, ge=0, le=0, description="only 0 (greedy decoding)")
    logit_bias: dict[str, float] | None = Field(None, max_length=0, description="not supported (only empty)")


# --- checks that need the limits or the task --------------------------------------------------------------


class Problems:
    """Collects problems and raises them together (a client fixes every field in one round trip)."""

    def __init__(self) -> None:
        self.items: list[dict] = []

    def add(self, loc: list, msg: str, type_: str) -> None:
        self.items.append({"loc": list(loc), "msg": msg, "type": type_})

    def text(self, loc: list, value: str | None, limit: int) -> None:
        if value is not None and len(value) > limit:
            self.add(loc, f"at most {limit} characters (got {len(value)})", "string_too_long")

    def raise_if_any(self) -> None:
        if self.items:
            raise FieldProblem(self.items)


def check_ids(p: Problems, limits: Limits, **ids: tuple[list, str | None]) -> None:
    for loc, value in ids.values():
        if value is not None and len(value) > limits.max_id_chars:
            p.add(loc, f"at most {limits.max_id_chars} characters (got {len(value)})", "string_too_long")


def to_records(
    items: list[RecordIn] | None,
    loc: tuple,
    task,
    limits: Limits,
    *,
    feedback: bool,
    today: dt.date | None = None,
    p: Problems | None = None,
) -> list[Record]:
    """Validated Records for the task. `feedback`: the records will be stored and trained on, so the answer field
    is required and must be a valid answer, and dates may not lie in the future (beyond max_future_days)."""
    own = p is None
    p = p or Problems()
    items = items or []
    cap = limits.max_feedback_records if feedback else limits.max_request_history
    if len(items) > cap:
        p.add([*loc], f"at most {cap} records (got {len(items)})", "too_long")
        p.raise_if_any()
    latest_allowed = (today or dt.datetime.now(dt.timezone.utc).date()) + dt.timedelta(days=limits.max_future_days)
    out = []
    for i, item in enumerate(items):
        here = [*loc, i]
        if len(item.id) > limits.max_id_chars:
            p.add([*here, "id"], f"at most {limits.max_id_chars} characters (got {len(item.id)})", "string_too_long")
        extra = dict(item.model_extra or {})
        if len(extra) > MAX_FIELDS_PER_RECORD:
            p.add(here, f"at most {MAX_FIELDS_PER_RECORD} fields (got {len(extra)})", "too_long")
            continue
        fields: dict[str, str] = {}
        for name, value in extra.items():
            where = [*here, name]
            if _has_lone_surrogate(name):
                p.add(here, "a field name contains a lone UTF-16 surrogate", "string_unicode")
                continue
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                p.add(where, f"must be a string, got {type(value).__name__}", "string_type")
                continue
            if isinstance(value, float) and not math.isfinite(value):
                p.add(where, f"must be a finite number, got {value}", "finite_number")
                continue
            text = str(value)
            if _has_lone_surrogate(text):
                p.add(where, "contains a lone UTF-16 surrogate (not valid Unicode text)", "string_unicode")
                continue
            p.text(where, text, limits.max_text_chars)
            fields[name] = text
        for name in task.profile_fields:
            if name == task.target_field and not feedback:
                continue  # history sent with a prediction may omit the answer
            if name not in fields:
                what = "the answer field" if name == task.target_field else "a field"
                p.add([*here, name], f"{what} {task.name} records need", "missing")
        answer = fields.get(task.target_field) if task.target_field else None
        if feedback and answer is not None:
            if task.labels is not None and answer not in task.labels:
                p.add(
                    [*here, task.target_field],
                    f"{answer!r} is not a {task.name} label; one of {list(task.labels)}",
                    "label",
                )
            elif task.labels is None and not answer.strip():
                p.add([*here, task.target_field], "the answer must not be empty", "string_too_short")
        date = parse_lamp_date(item.date)
        if feedback and date is not None and date > latest_allowed:
            p.add(
                [*here, "date"],
                f"{date.isoformat()} is in the future (at most {limits.max_future_days} day(s) after "
                f"today, {latest_allowed.isoformat()})",
                "date_in_future",
            )
        out.append(Record(id=item.id, fields=fields, date=date, raw_date=item.date))
    if own:
        p.raise_if_any()
    return out
