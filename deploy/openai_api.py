"""POST /v1/completions: OpenAI's (legacy) completions API, personalized by the request's own `user` field.

An application that already calls an OpenAI-compatible server changes only the base URL and key:

    client = openai.OpenAI(base_url="http://tapper/v1", api_key=TAPPER_API_TOKEN)
    client.completions.create(model="tapper", prompt=lamp_input, user="user-42", max_tokens=8)

`user` is OpenAI's end-user id; here it picks the user's row and history (required, a 422 without it). The
prompt is the task's input text (a LaMP `input`), as for /predict; a list of prompts answers each (one choice
per prompt, batched like any other predictions). Decoding is greedy: `temperature` and `top_p` are accepted and
have no effect. What tapper cannot do is refused naming the field (stream, n > 1, echo, logprobs, best_of,
suffix), rather than silently ignored. `stop` sequences cut the returned text.
"""

from __future__ import annotations

import time
import uuid

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response

from deploy.auth import bearer_scheme
from deploy.errors import FieldProblem, responses
from deploy.inference import PredictJob
from deploy.schemas import CompletionRequest, Problems, check_ids

# Prompts one request may hold (each is a row of a batch).
MAX_PROMPTS = 16


def _unsupported(req: CompletionRequest) -> list[dict]:
    out = []
    for name, bad, why in (
        ("stream", req.stream, "streaming is not supported"),
        ("echo", req.echo, "echo is not supported"),
        ("logprobs", req.logprobs is not None, "logprobs are not supported"),
        ("suffix", req.suffix is not None, "suffix (insertion) is not supported"),
    ):
        if bad:
            out.append({"loc": ["body", name], "msg": why, "type": "unsupported"})
    for name in sorted(req.model_extra or {}):
        out.append({"loc": ["body", name], "msg": "not a parameter this server supports", "type": "extra_forbidden"})
    return out


def _cut_at_stop(text: str, stop) -> tuple[str, bool]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def register(app: FastAPI, svc, auth, limits, await_predictions, client_gone: int) -> None:
    @app.post(
        "/v1/completions", responses=responses(400, 401, 413, 422, 500, 503), dependencies=[Depends(bearer_scheme)]
    )
    async def completions(req: CompletionRequest, request: Request, role: str = Depends(auth.api)):
        svc.loaded  # noqa: B018 - 503 before anything is queued
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        p = Problems()
        for item in _unsupported(req):
            p.add(item["loc"], item["msg"], item["type"])
        check_ids(p, limits, user=(["body", "user"], req.user))
        if not prompts or len(prompts) > MAX_PROMPTS:
            p.add(["body", "prompt"], f"give 1 to {MAX_PROMPTS} prompts", "too_long")
        for i, text in enumerate(prompts):
            loc = ["body", "prompt"] if isinstance(req.prompt, str) else ["body", "prompt", i]
            if not text.strip():
                p.add(loc, "must not be empty", "string_too_short")
            p.text(loc, text, limits.max_text_chars)
        if req.max_tokens is not None and req.max_tokens > limits.max_new_tokens:
            p.add(["body", "max_tokens"], f"at most {limits.max_new_tokens}", "less_than_equal")
        if p.items:
            raise FieldProblem(p.items)
        futures = []
        try:
            for text in prompts:
                futures.append(svc.submit(PredictJob(user_id=req.user, text=text, max_new_tokens=req.max_tokens)))
        except BaseException:  # the queue filled up part way: the ones queued are not wanted any more
            for f in futures:
                f.cancel()
            raise
        results = await await_predictions(futures, request)
        if results is None:
            return Response(status_code=client_gone)
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for i, r in enumerate(results):
            text, stopped = _cut_at_stop(r["text"], req.stop)
            choices.append(
                {"text": text, "index": i, "logprobs": None, "finish_reason": "stop" if stopped else r["finish_reason"]}
            )
            prompt_tokens += r["prompt_tokens"]
            completion_tokens += r["completion_tokens"]
        first = results[0]
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": first["model_version"],
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "system_fingerprint": f"tapper-{first['mode']}-{first['generation'] or 'bundle'}-{first['sequence']}",
        }
