"""The hot paths of issue 21 item 3 outside the training step, old form against new, in one process.

    python bench/hotpaths.py [--records 400] [--texts 256] [--out bench/results/hotpaths_smollm2_cpu.json]

Each "old" form is the code before the fix, inlined here (a few lines each), so both run on the same data in
the same process:
- backbone hash of the SmolLM2 directory: every tensor of the loaded model (tensor_hash, what weights_hash
  was) against the weight files' bytes (weights_hash: first call, then a later call in the same run);
- pooling --texts record texts of up to 512 tokens on SmolLM2's embedding: the padded [texts, longest, d]
  gather and masked mean against embedding_bag (and the largest difference between the two);
- the BM25 pre-filter (k = 4) of one user's Stage-2 examples, the i-th searching the i-1 records before it
  (news headlines + descriptions from /work/shared/data/news_category): a BM25Okapi built per example
  against one Bm25Index for the user (and whether the kept records are the same);
- generation padding: prompt tokens padded to the batch's longest, batches of 16 in the given order against
  length-sorted, for the same texts' token counts.
Times are the best of --repeats; the 1-minute load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from tapper.atomic import atomic_write_json  # noqa: E402

NEWS = Path("/work/shared/data/news_category/news_category_merged_2018-02-28_2022-09-23.jsonl")


def best_of(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def texts(n: int, seed: int = 0) -> list[str]:
    rows = [json.loads(line) for line in NEWS.read_text().splitlines()]
    random.Random(seed).shuffle(rows)
    return [f"{r['headline']} {r['short_description']}" for r in rows[:n]]


def hash_bench(path: Path, repeats: int) -> dict:
    import tapper.model.backbone as backbone

    bb = backbone.load_backbone_dir(path, device="cpu")
    old, _ = best_of(lambda: backbone.tensor_hash(bb.model), repeats)
    backbone._FILE_DIGESTS.clear()
    t0 = time.perf_counter()
    backbone.weights_hash(path)
    first = time.perf_counter() - t0
    again, _ = best_of(lambda: backbone.weights_hash(path), repeats)
    size = sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors")
    return {"weight_file_bytes": size, "old_tensor_hash_s": old, "new_first_call_s": first, "new_later_call_s": again}


def pooling_bench(path: Path, sample: list[str], repeats: int) -> dict:
    import torch.nn.functional as F

    from tapper.model.backbone import load_backbone_dir

    bb = load_backbone_dir(path, device="cpu")
    emb = bb.model.get_input_embeddings().weight.detach().float()
    tok = bb.tokenizer
    long = [" ".join([t] * 8) for t in sample]  # records of a few hundred tokens, as LaMP-3/4/5 have

    def old():
        enc = tok(long, add_special_tokens=False, truncation=True, max_length=512, padding=True, return_tensors="pt")
        mask = enc["attention_mask"].unsqueeze(-1).float()
        return (emb[enc["input_ids"]] * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def new():
        ids = tok(long, add_special_tokens=False, truncation=True, max_length=512)["input_ids"]
        lengths = torch.tensor([len(x) for x in ids])
        flat = torch.tensor([t for x in ids for t in x])
        return F.embedding_bag(flat, emb, torch.cumsum(lengths, 0) - lengths, mode="mean")

    t_old, v_old = best_of(old, repeats)
    t_new, v_new = best_of(new, repeats)
    n_tok = [len(x) for x in tok(long, add_special_tokens=False, truncation=True, max_length=512)["input_ids"]]
    return {
        "texts": len(long),
        "mean_tokens": sum(n_tok) / len(n_tok),
        "longest": max(n_tok),
        "d": int(emb.shape[1]),
        "old_padded_gather_bytes": len(long) * max(n_tok) * int(emb.shape[1]) * 4,
        "old_s": t_old,
        "new_s": t_new,
        "max_abs_diff": float((v_old - v_new).abs().max()),
    }


def bm25_bench(records: list[str], repeats: int, k: int = 4) -> dict:
    from rank_bm25 import BM25Okapi

    from tapper.data import bm25

    queries = [r.split(" ", 12)[-1] for r in records]  # a query overlapping its record's words

    def old():
        kept = []
        for i in range(1, len(records)):
            corpus = [bm25.bm25_tokens(t) or ["<empty>"] for t in records[:i]]
            q = bm25.bm25_tokens(queries[i])
            s = BM25Okapi(corpus).get_scores(q)
            kept.append(sorted(sorted(range(i), key=lambda j: (-float(s[j]), -j))[:k]))
        return kept

    def new():
        index, kept = bm25.Bm25Index(), []
        for i in range(1, len(records)):
            s = index.scores(bm25.bm25_tokens(queries[i]), [index.doc(t) for t in records[:i]])
            kept.append(sorted(sorted(range(i), key=lambda j: (-float(s[j]), -j))[:k]))
        return kept

    t_old, k_old = best_of(old, repeats)
    t_new, k_new = best_of(new, repeats)
    return {
        "records": len(records),
        "examples": len(records) - 1,
        "k": k,
        "old_s": t_old,
        "new_s": t_new,
        "same_records_kept": k_old == k_new,
    }


def padding_bench(path: Path, sample: list[str], batch: int = 16) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in sample]

    def padded(order):
        return sum(
            max(lengths[i] for i in order[b : b + batch]) * len(order[b : b + batch])
            for b in range(0, len(order), batch)
        )

    given = list(range(len(lengths)))
    return {
        "prompts": len(lengths),
        "batch": batch,
        "real_tokens": sum(lengths),
        "old_padded_tokens": padded(given),
        "new_padded_tokens": padded(sorted(given, key=lambda i: -lengths[i])),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=400)
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "hotpaths_smollm2_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from tapper.model.backbone import ensure_smollm2_dir

    path = ensure_smollm2_dir()
    sample = texts(max(args.records, args.texts))
    load = [os.getloadavg()[0]]
    res = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": args.threads},
        "settings": vars(args),
    }
    res["backbone_hash"] = hash_bench(path, args.repeats)
    res["pooling"] = pooling_bench(path, sample[: args.texts], args.repeats)
    res["bm25_prefilter"] = bm25_bench(sample[: args.records], args.repeats)
    res["generation_padding"] = padding_bench(path, sample[: args.records])
    load.append(os.getloadavg()[0])
    res["load_1min"] = load
    atomic_write_json(Path(args.out), res)
    print(json.dumps({k: v for k, v in res.items() if k not in ("machine", "settings")}, indent=1))


if __name__ == "__main__":
    main()
