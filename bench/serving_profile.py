"""Where a prediction's time goes on the serving path, in one process: TAP-PER against the bare backbone and RAG-k4.

    python bench/serving_profile.py [--backbone smollm2] [--batches 1,8] [--reps 3] [--threads 1]
                                    [--out bench/results/serving_profile_smollm2_cpu.json]

bench/serving.py measures the servers over HTTP; this looks inside one batch of the same Predictor code
(deploy.inference) on the same bundle and queries (bench/serving.py builds and caches it): the time spent
before generation (reading the state, tokenizing, TAP-PER's P_q/P_u prefix, RAG's retrieval) and in generation
(the forward passes), the tokens the forward pass reads, and torch's operator profile of one batch. The modes
take turns batch by batch (T B R T B R ...) so that the machine's load (other jobs) falls on all alike.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench_io import write_results  # noqa: E402

MODES = ("tapper", "base", "rag")


class Timed:
    """Wraps a Predictor's language model: the seconds its last generate() took."""

    def __init__(self, plm):
        self.plm, self.seconds = plm, 0.0

    def generate(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.plm.generate(*args, **kwargs)
        finally:
            self.seconds = time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    import torch

    import serving
    from deploy.config import Auth, ServeConfig
    from deploy.inference import PredictJob
    from deploy.service import TapperService

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="smollm2")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default=str(Path.home() / ".cache" / "tapper" / "bench-serving"))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    bundle, queries, _ = serving.ensure_bundle(args.backbone, work)
    random.Random(0).shuffle(queries)
    runs = work / args.backbone / "profile" / time.strftime("%Y%m%dT%H%M%S")
    services, predictors = {}, {}
    for m in MODES:
        cfg = ServeConfig(model_dir=bundle, state_dir=runs / f"live-{m}", mode=m, auth=Auth(insecure_local=True))
        services[m] = TapperService(cfg)
        services[m].load()
        pred = services[m]._predictor
        pred.plm = Timed(pred.plm)
        predictors[m] = pred

    def jobs(k: int, offset: int) -> list:
        qs = [queries[(offset + j) % len(queries)] for j in range(k)]
        return [PredictJob(user_id=q["user_id"], text=q["input"]) for q in qs]

    for m in MODES:  # warm-up: caches, allocations
        predictors[m].run(jobs(2, 0))
    load_start = [round(x, 2) for x in os.getloadavg()]
    results = []
    for k in [int(b) for b in args.batches.split(",")]:
        samples: dict = {m: [] for m in MODES}
        for rep in range(args.reps):
            for m in MODES:
                t0 = time.perf_counter()
                out = predictors[m].run(jobs(k, 3 + rep * k))
                total = time.perf_counter() - t0
                gen = predictors[m].plm.seconds
                samples[m].append(
                    {
                        "total_s": total,
                        "generate_s": gen,
                        "before_generate_s": total - gen,
                        "prompt_tokens": sum(o["prompt_tokens"] for o in out),
                        "completion_tokens": [o["completion_tokens"] for o in out],
                    }
                )
        for m in MODES:
            s = samples[m]
            med = {
                key: round(statistics.median(x[key] for x in s), 4)
                for key in ("total_s", "generate_s", "before_generate_s")
            }
            toks = statistics.mean(x["prompt_tokens"] for x in s)
            row = {
                "mode": m,
                "batch": k,
                "reps": len(s),
                **med,
                "prompt_tokens_per_batch": round(toks, 1),
                "ms_per_prompt_token_in_generate": round(1000 * med["generate_s"] / toks, 3),
                "completion_tokens": [x["completion_tokens"] for x in s],
            }
            results.append(row)
            print(
                f"{m:6s} batch {k}: total {med['total_s']:.3f} s  before generate {med['before_generate_s']:.3f} s  "
                f"generate {med['generate_s']:.3f} s  {toks:.0f} prompt tokens  "
                f"{row['ms_per_prompt_token_in_generate']} ms/token",
                flush=True,
            )
    from torch.profiler import ProfilerActivity, profile

    ops = {}
    for m in ("tapper", "base"):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            predictors[m].run(jobs(8, 1))
        table = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        whole = sum(e.self_cpu_time_total for e in table)
        ops[m] = [
            {"op": e.key, "self_share": round(e.self_cpu_time_total / whole, 3), "calls": e.count} for e in table[:8]
        ]
        print(m, "batch 8, top operators by self CPU time:", [(o["op"], o["self_share"]) for o in ops[m]], flush=True)
    for s in services.values():
        s.close()
    out = Path(args.out or ROOT / "bench" / "results" / f"serving_profile_{args.backbone}_cpu.json")
    write_results(
        out,
        "serving_profile.py",
        argv,
        [{"backbone": args.backbone, "batches": results, "operators_batch8": ops}],
        torch=torch.__version__,
        torch_threads=args.threads,
        loadavg_start=load_start,
        loadavg_end=[round(x, 2) for x in os.getloadavg()],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
