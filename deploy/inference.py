"""One batch of predictions: each row its own user, history and prefix, one forward pass for all.

Three modes, one code path (ServeConfig.mode), so that a benchmark compares like with like:

    tapper  the TAP-PER prefix (P_u + P_q from the user's history) in front of the prompt, the bridge LoRA on
    base    the bare Stage-1 backbone: the prompt alone (no prefix, bridge off)
    rag     the Stage-1 backbone with the user's k most relevant records (BM25, LaMP's wording) in the prompt

The per-user state a batch needs (histories, rows) is read, and the prefixes computed, under `Loaded.lock`;
generation runs without it (deploy.loaded). Rows are left-padded to the longest prompt; greedy decoding with a
KV cache runs until every row has ended or the batch's largest `max_new_tokens` is reached, and each row is
cut to its own limit.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from dataclasses import dataclass, field

from deploy.loaded import Loaded, ServingEncoder, ServingVectors, max_token_chars, merged_lm
from deploy.histories import merge_histories
from tapper.data.types import Example, Record


@dataclass
class PredictJob:
    user_id: str
    text: str  # the task's full input (a LaMP `input`)
    history: list[Record] = field(default_factory=list)  # sent with the request, not stored
    query_date: dt.date | None = None
    query_id: str | None = None
    max_new_tokens: int | None = None


class Predictor:
    """Runs batches of PredictJobs on one Loaded model (a new Predictor after each reload)."""

    def __init__(
        self, ld: Loaded, mode: str, rag_k: int, default_max_new_tokens: int | None, merge_bridge: bool = True
    ):
        from tapper.eval.predict import default_max_new_tokens as task_default

        self.ld, self.mode, self.rag_k = ld, mode, rag_k
        bb, model = ld.backbone, ld.model
        # The language model that generates: in tapper mode with the bridge merged into a private copy of the
        # weights it adapts (deploy.loaded.merged_lm); base and rag run the backbone with the bridge switched off.
        self.plm = merged_lm(model) if mode == "tapper" and model.cfg.use_bridge and merge_bridge else model.plm
        self.tokenizer = bb.tokenizer  # used by the batch worker only (deploy.batcher)
        self.vectors = ServingVectors(bb.model, self.tokenizer)
        cfg = model.cfg
        tapper_mode = mode == "tapper"
        self.encoder = ServingEncoder(
            ld.task,
            self.tokenizer,
            self.vectors,
            max_len=cfg.max_len,
            prefix_len=cfg.prefix_len if tapper_mode else 0,
            bm25_k=cfg.bm25_k if tapper_mode else None,
            max_token_chars=max_token_chars(self.tokenizer),
        )
        self.max_len = cfg.max_len
        self.default_max_new = default_max_new_tokens or task_default(ld.task)

    def run(self, jobs: list[PredictJob]) -> list[dict | BaseException]:
        from tapper.train.features import lm_generate_batch

        ld, model = self.ld, self.ld.model
        results: list[dict | BaseException | None] = [None] * len(jobs)
        examples: list[tuple[int, Example, int]] = []  # (job index, example, history stored)
        with ld.lock:
            generation, sequence = ld.generation, ld.sequence
            for i, job in enumerate(jobs):
                try:
                    stored = ld.histories.get(job.user_id, [])
                except ValueError as err:  # HistoryError: this user's stored data is malformed; the others go on
                    results[i] = err
                    continue
                used = (
                    merge_histories({job.user_id: stored}, {job.user_id: list(job.history)}).get(job.user_id, [])
                    if job.history
                    else list(stored)
                )
                qid = job.query_id or uuid.uuid4().hex
                ex = Example(
                    id=qid, user_id=job.user_id, input=job.text, target=None, history=used, query_date=job.query_date
                )
                examples.append((i, ex, len(stored)))
            known = {ex.user_id: ex.user_id in model.user_rows for _, ex, _ in examples}
            rows = {u: model.user_rows.get(u, 0) for u in known} if model.cfg.use_pu else {}
            prefix = None
            if examples and self.mode == "tapper":
                # A user the table has no row for is served with P_q only (row 0), as a cold start.
                encoded = self.encoder.encode(
                    [ex for _, ex, _ in examples], rows, progress=False, unknown_users="pq_only"
                )
                prefix, _ = model.prefix_for(encoded.items, encoded.vectors)
        if not examples:
            return results
        if self.mode == "base":
            # The prompt alone: no history is embedded (nothing would read its vectors).
            bare = [dataclasses.replace(ex, history=[]) for _, ex, _ in examples]
            encoded = self.encoder.encode(bare, None, progress=False)
        elif self.mode == "rag":
            from tapper.methods.prompted import encode_augmented

            encoded, _ = encode_augmented(
                ld.task, self.tokenizer, [ex for _, ex, _ in examples], self.rag_k, self.max_len
            )
        wanted = [jobs[i].max_new_tokens or self.default_max_new for i, _, _ in examples]
        tok = self.tokenizer
        generated = self.plm.generate(
            lm_generate_batch(encoded.items, tok.pad_token_id), prefix, max(wanted), tok.eos_token_id
        )
        for (i, ex, n_stored), item, ids, limit in zip(examples, encoded.items, generated, wanted):
            ids = ids[:limit]
            text = tok.decode(ids, skip_special_tokens=True)
            results[i] = {
                "id": ex.id,
                "user_id": ex.user_id,
                "prediction": ld.task.parse_prediction(text),
                "text": text,
                "known_user": known[ex.user_id],
                "user_row": rows.get(ex.user_id, 0) if self.mode == "tapper" else 0,
                "history_used": len(item.hist_rows) if self.mode == "tapper" else len(item.history_ids),
                "history_stored": n_stored,
                "model_version": ld.bundle.version,
                "generation": generation,
                "sequence": sequence,
                "mode": self.mode,
                "batch_size": len(examples),
                "prompt_tokens": len(item.prompt_ids) + (model.cfg.prefix_len if self.mode == "tapper" else 0),
                "completion_tokens": len(ids),
                "finish_reason": "stop" if len(ids) < limit else "length",
            }
        return results
