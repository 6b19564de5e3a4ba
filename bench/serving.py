"""Serving latency and throughput over real HTTP: TAP-PER against the bare Stage-1 backbone and RAG-k4.

    python bench/serving.py [--backbones tiny,smollm2] [--concurrency 1,8,32] [--requests 24,64,128]
                            [--max-seconds 90] [--feedback-seconds 40] [--threads N] [--work DIR]
                            [--out bench/results/serving_cpu.json]

For each backbone it builds (once, cached in --work) a small trained bundle on the embedded LaMP_2N data
(Stage 1 on other users' examples, Stage 2 on the most active users; max_len 512, the paper's, so that RAG's
four records fit in the prompt), then starts three real servers (`python -m deploy.serve serve`, one process
each, --insecure-local on 127.0.0.1) on that bundle, the same server code in the three modes:

    tapper  TAP-PER: the user's prefix (P_u + P_q over their stored history) in front of the prompt
    base    the bare Stage-1 backbone: the prompt alone
    rag     the Stage-1 backbone with the user's 4 BM25-best records written into the prompt (LaMP's RAG)

and drives them over loopback with closed-loop clients (each keeps one request in flight, on a keep-alive
connection): for each concurrency, the same queries (the evaluation queries of the Stage-2 users, cycled) go to
each mode, the three taking turns in --rounds segments (T B R T B R ...) so that they see the same machine load.
Per run: requests answered, throughput, p50/p90/p99 latency as the client sees it, mean batch size and generated
tokens as the servers report them, and the machine's 1-minute load average around each segment (other jobs share
this CPU: compare modes within one concurrency).

Then, on the TAP-PER server, prediction latency at concurrency 8 without and while feedback streams in: one
client sends /feedback continuously (each a new record for a Stage-2 user; an Online-Emb update and a durable
journal write each), the predictions' p99 is compared with the same load without it.

Bounded: each run stops at its request count or --max-seconds, whichever comes first.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench_io import write_results  # noqa: E402

MODES = ("tapper", "base", "rag")
TODAY = time.strftime("%Y-%m-%d", time.gmtime())
RUNS = {
    # Small budgets: the bench measures serving, not accuracy; the models only need to answer like trained ones
    # (a label, then end of sequence) so that every mode generates what it would in production.
    "tiny": {
        "stage2_users": 10,
        "seed": 0,
        "stage1": {"epochs": 2, "lr": 0.01, "batch_size": 8, "max_len": 512, "max_examples": 256},
        "stage2": {"epochs": 1, "lr": 0.001, "batch_size": 8, "max_len": 512, "max_examples_per_user": 4},
    },
    "smollm2": {
        "stage2_users": 10,
        "seed": 0,
        "stage1": {"epochs": 1, "lr": 3.0e-4, "batch_size": 8, "max_len": 512, "max_examples": 96},
        "stage2": {"epochs": 1, "lr": 1.0e-3, "batch_size": 8, "max_len": 512, "max_examples_per_user": 4},
    },
}


# --- the bundle ---------------------------------------------------------------------------------------------


def ensure_bundle(backbone: str, work: Path) -> tuple[Path, list[dict], list[dict]]:
    """A trained bundle for `backbone` under `work` (built once), the benchmark's queries and feedback users."""
    from deploy.bundle import export_bundle, read_bundle
    from tapper.config import load_run_config
    from tapper.experiment import open_backbone, prepare_data, run_stage1, train_tapper_variant
    from tapper.resources import default_dataset_paths

    questions, outputs, _ = default_dataset_paths()
    cfg = load_run_config(RUNS[backbone])
    data = prepare_data("LaMP_2N", questions, outputs, cfg.stage2_users)
    queries = [{"user_id": ex.user_id, "input": ex.input} for ex in data.splits.eval]
    bundle = work / backbone / "bundle"
    if not (bundle / "model.json").is_file():
        t0 = time.time()
        bb = open_backbone(backbone, data, cfg.seed)
        s1 = run_stage1(bb, data, cfg, work / backbone / "stage1", progress=False)
        _, result = train_tapper_variant("tap-per", s1.path, data, cfg, progress=False)
        result.model.save(work / backbone / "state")
        histories: dict = {}
        for ex in data.splits.eval:
            if len(ex.history) > len(histories.get(ex.user_id, [])):
                histories[ex.user_id] = list(ex.history)
        export_bundle(
            s1.path,
            work / backbone / "state",
            "LaMP_2N",
            bundle,
            version=f"bench-{backbone}",
            histories=histories,
            overwrite=True,
        )
        print(f"[{backbone}] bundle built in {time.time() - t0:.0f} s", flush=True)
    read_bundle(bundle)
    return bundle, queries, [{"user_id": ex.user_id} for ex in data.splits.eval]


# --- servers ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `tapper serve` process on loopback."""

    def __init__(self, bundle: Path, state: Path, mode: str, threads: int, max_batch: int, log: Path):
        self.port = free_port()
        self.mode = mode
        # OMP_WAIT_POLICY=PASSIVE as the serving image sets it (deploy/Dockerfile): no busy-waiting OpenMP threads.
        env = {
            **os.environ,
            "TAPPER_TORCH_THREADS": str(threads),
            "OMP_NUM_THREADS": str(threads),
            "OMP_WAIT_POLICY": "PASSIVE",
        }
        for k in ("TAPPER_API_TOKEN", "TAPPER_ADMIN_TOKEN"):
            env.pop(k, None)
        args = [
            sys.executable,
            "-m",
            "deploy.serve",
            "serve",
            "--model-dir",
            str(bundle),
            "--state-dir",
            str(state),
            "--port",
            str(self.port),
            "--insecure-local",
            "--mode",
            mode,
            "--max-batch",
            str(max_batch),
            "--batch-wait-ms",
            "5",
            "--max-queue",
            "1024",
            "--feedback-steps",
            "1",
            "--log-level",
            "warning",
        ]
        self.log = open(log, "w")
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.mode} server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                status, _ = request(self.port, "GET", "/health", None, timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.mode} server not ready in {timeout} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def request(
    port: int,
    method: str,
    path: str,
    body: dict | None,
    timeout: float = 300,
    conn: http.client.HTTPConnection | None = None,
) -> tuple[int, dict]:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else {}
    finally:
        if own:
            conn.close()


# --- load ---------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def drive(
    port: int, queries: list[dict], concurrency: int, n_requests: int, max_seconds: float, offset: int = 0
) -> dict:
    """`concurrency` closed-loop clients send /predict for queries[(offset + i) % len] until n_requests are answered
    or max_seconds pass; the raw samples."""
    lock = threading.Lock()
    state = {"next": 0}
    samples: dict = {"latencies": [], "batches": [], "tokens": [], "prompt_tokens": [], "errors": []}
    deadline = time.monotonic() + max_seconds

    def worker():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        try:
            while time.monotonic() < deadline:
                with lock:
                    i = state["next"]
                    if i >= n_requests:
                        return
                    state["next"] += 1
                q = queries[(offset + i) % len(queries)]
                t0 = time.perf_counter()
                status, body = request(port, "POST", "/predict", q, conn=conn)
                dt = time.perf_counter() - t0
                with lock:
                    if status == 200:
                        samples["latencies"].append(dt)
                        samples["batches"].append(body.get("batch_size", 1))
                        samples["tokens"].append(body.get("completion_tokens", 0))
                        samples["prompt_tokens"].append(body.get("prompt_tokens", 0))
                    else:
                        samples["errors"].append(f"{status}: {str(body)[:120]}")
        finally:
            conn.close()

    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    samples["wall_s"] = time.perf_counter() - t0
    samples["loadavg"] = [load_before, os.getloadavg()[0]]
    samples["time_bounded"] = len(samples["latencies"]) + len(samples["errors"]) < n_requests
    return samples


def summarize(concurrency: int, parts: list[dict]) -> dict:
    """One run's figures from the samples of its segments (rounds)."""
    lat = [x for p in parts for x in p["latencies"]]
    batches = [x for p in parts for x in p["batches"]]
    tokens = [x for p in parts for x in p["tokens"]]
    prompt = [x for p in parts for x in p["prompt_tokens"]]
    errors = [x for p in parts for x in p["errors"]]
    wall = sum(p["wall_s"] for p in parts)
    loads = [x for p in parts for x in p["loadavg"]]
    return {
        "concurrency": concurrency,
        "requests": len(lat),
        "errors": len(errors),
        "error_sample": errors[:3],
        "wall_s": round(wall, 2),
        "throughput_rps": round(len(lat) / wall, 3) if wall else None,
        "p50_ms": round(1000 * percentile(lat, 0.5), 1),
        "p90_ms": round(1000 * percentile(lat, 0.9), 1),
        "p99_ms": round(1000 * percentile(lat, 0.99), 1),
        "mean_batch": round(statistics.mean(batches), 2) if batches else None,
        "mean_generated_tokens": round(statistics.mean(tokens), 2) if tokens else None,
        # What the model reads per request (TAP-PER: the prompt and its prefix_len soft tokens; RAG: the prompt
        # with the retrieved records): on a CPU the forward pass's cost grows with it.
        "mean_prompt_tokens": round(statistics.mean(prompt), 1) if prompt else None,
        "time_bounded": any(p["time_bounded"] for p in parts),
        "segments": len(parts),
        "loadavg_1min": {
            "min": round(min(loads), 2),
            "max": round(max(loads), 2),
            "mean": round(statistics.mean(loads), 2),
        },
    }


def load(port: int, queries: list[dict], concurrency: int, n_requests: int, max_seconds: float) -> dict:
    return summarize(concurrency, [drive(port, queries, concurrency, n_requests, max_seconds)])


def feedback_stream(port: int, users: list[dict], stop: threading.Event, out: dict, seed: int = 0) -> None:
    """One client sending /feedback back to back until `stop`: each a new dated record for a Stage-2 user."""
    from tapper.data.tasks import LAMP_2N_LABELS

    rng = random.Random(seed)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    n = 0
    try:
        while not stop.is_set():
            user = rng.choice(users)["user_id"]
            label = rng.choice(LAMP_2N_LABELS)
            rec = {
                "id": f"bench-fb-{seed}-{n}",
                "date": TODAY,
                "text": f"a short news story about {label} number {n}",
                "title": f"On {label}",
                "category": label,
            }
            t0 = time.perf_counter()
            status, body = request(port, "POST", "/feedback", {"user_id": user, "records": [rec]}, conn=conn)
            out.setdefault("latencies", []).append(time.perf_counter() - t0)
            out["ok" if status == 200 else "errors"] = out.get("ok" if status == 200 else "errors", 0) + 1
            n += 1
    finally:
        conn.close()


def feedback_comparison(
    port: int,
    queries: list[dict],
    users: list[dict],
    concurrency: int,
    n_requests: int,
    max_seconds: float,
    rounds: int,
) -> dict:
    """Prediction latency at `concurrency` without and while one client streams feedback, in alternating segments
    (without, with, without, with ...) so that both see the same machine load."""
    without_parts, with_parts, fb_parts = [], [], []
    for r in range(rounds):
        size = n_requests // rounds
        without_parts.append(drive(port, queries, concurrency, size, max_seconds / rounds, offset=r * size))
        stop = threading.Event()
        fb: dict = {}
        thread = threading.Thread(target=feedback_stream, args=(port, users, stop, fb, r))
        thread.start()
        time.sleep(0.5)  # the stream is running before the predictions start
        try:
            with_parts.append(drive(port, queries, concurrency, size, max_seconds / rounds, offset=r * size))
        finally:
            stop.set()
            thread.join()
        fb_parts.append(fb)
    without, during = summarize(concurrency, without_parts), summarize(concurrency, with_parts)
    lat = [x for fb in fb_parts for x in fb.get("latencies", [])]
    during["feedback"] = {
        "sent": len(lat),
        "ok": sum(fb.get("ok", 0) for fb in fb_parts),
        "errors": sum(fb.get("errors", 0) for fb in fb_parts),
        "rate_per_s": round(len(lat) / (during["wall_s"] + 0.5 * rounds), 2),
        "p50_ms": round(1000 * percentile(lat, 0.5), 1),
        "p99_ms": round(1000 * percentile(lat, 0.99), 1),
    }
    return {
        "concurrency": concurrency,
        "without": without,
        "with": during,
        "p99_ratio": round(during["p99_ms"] / without["p99_ms"], 3) if without["p99_ms"] else None,
        "p50_ratio": round(during["p50_ms"] / without["p50_ms"], 3) if without["p50_ms"] else None,
    }


def durable_write_cost(directory: Path, row_floats: int, n: int = 50) -> dict:
    """What durability costs a feedback: one journal entry (a row of `row_floats` floats + metadata) written with
    deploy.durable (fsync file, rename, fsync directory) against the same write and rename without the fsyncs, on
    the filesystem of `directory` (where the bench's state directories are)."""
    import torch
    from safetensors.torch import save

    from deploy.durable import durable_write_bytes

    directory.mkdir(parents=True, exist_ok=True)
    data = save({"rows": torch.randn(1, row_floats)}, metadata={"delta": json.dumps({"records": "x" * 600})})
    fast, durable = [], []
    for i in range(n):
        t0 = time.perf_counter()
        tmp = directory / f".plain-{i}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, directory / f"plain-{i}")
        fast.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        durable_write_bytes(directory / f"durable-{i}", data)
        durable.append(time.perf_counter() - t0)
    for p in directory.iterdir():
        p.unlink()
    return {
        "bytes": len(data),
        "writes": n,
        "rename_only_ms_median": round(1000 * statistics.median(fast), 3),
        "durable_ms_median": round(1000 * statistics.median(durable), 3),
        "durable_ms_p99": round(1000 * percentile(durable, 0.99), 3),
    }


# --- the benchmark ------------------------------------------------------------------------------------------


def bench_backbone(backbone: str, args, work: Path) -> dict:
    bundle, queries, users = ensure_bundle(backbone, work)
    random.Random(0).shuffle(queries)
    levels = [int(c) for c in args.concurrency.split(",")]
    counts = [int(n) for n in args.requests.split(",")]
    if len(counts) != len(levels):
        raise SystemExit("--requests needs one count per --concurrency level")
    runs = work / backbone / "runs" / time.strftime("%Y%m%dT%H%M%S")
    runs.mkdir(parents=True, exist_ok=True)
    servers = {m: Server(bundle, runs / f"live-{m}", m, args.threads, args.max_batch, runs / f"{m}.log") for m in MODES}
    out: dict = {"backbone": backbone, "queries": len(queries), "bundle": str(bundle), "runs": []}
    try:
        for s in servers.values():
            s.wait_ready()
        for m, s in servers.items():  # warm-up: first batches pay one-off costs (allocations, caches)
            for q in queries[: min(8, len(queries))]:
                request(s.port, "POST", "/predict", q)
            load(s.port, queries, min(8, max(levels)), 16, args.max_seconds)
        for c, n in zip(levels, counts):
            # The modes take turns in `rounds` segments of n / rounds requests each (T B R T B R ...), so that a
            # change in the machine's load (other jobs) falls on all three alike.
            rounds = max(1, min(args.rounds, n // max(c, 1)))
            parts: dict = {m: [] for m in MODES}
            for r in range(rounds):
                for m in MODES:
                    size = n // rounds + (1 if r < n % rounds else 0)
                    parts[m].append(
                        drive(servers[m].port, queries, c, size, args.max_seconds / rounds, offset=r * size)
                    )
            for m in MODES:
                res = summarize(c, parts[m])
                res["mode"] = m
                out["runs"].append(res)
                print(
                    f"[{backbone}] {m:6s} c={c:<3d} {res['requests']:4d} req  {res['throughput_rps']:7.2f} req/s  "
                    f"p50 {res['p50_ms']:8.1f} ms  p99 {res['p99_ms']:8.1f} ms  batch {res['mean_batch']}  "
                    f"tokens {res['mean_prompt_tokens']}+{res['mean_generated_tokens']}  load "
                    f"{res['loadavg_1min']['mean']}",
                    flush=True,
                )
        # Predictions while feedback streams in (TAP-PER), against the same load without it, back to back.
        c, n = args.feedback_concurrency, args.feedback_requests
        out["feedback"] = feedback_comparison(
            servers["tapper"].port, queries, users, c, n, args.feedback_seconds, max(1, min(args.rounds, n // c))
        )
        without, during = out["feedback"]["without"], out["feedback"]["with"]
        print(
            f"[{backbone}] feedback stream: prediction p99 {without['p99_ms']} -> {during['p99_ms']} ms "
            f"(x{out['feedback']['p99_ratio']}), {during['feedback']['sent']} feedbacks "
            f"({during['feedback']['rate_per_s']}/s, p50 {during['feedback']['p50_ms']} ms)",
            flush=True,
        )
    finally:
        for s in servers.values():
            s.stop()
    cfg = json.loads((bundle / "tapper" / "tapper_config.json").read_text())
    out["durable_write"] = durable_write_cost(runs / "fsync-probe", cfg["stage2"]["prefix_len"] * cfg["d"])
    print(
        f"[{backbone}] a journal entry: {out['durable_write']['durable_ms_median']} ms durable, "
        f"{out['durable_write']['rename_only_ms_median']} ms without fsync (median)",
        flush=True,
    )
    out["targets"] = targets(out)
    return out


def targets(result: dict) -> dict:
    """The issue's targets, computed from this run (reported for every backbone; the issue sets them for SmolLM2)."""
    by = {(r["mode"], r["concurrency"]): r for r in result["runs"]}
    levels = sorted({r["concurrency"] for r in result["runs"]})
    t: dict = {"tapper_p50_over_base": {}, "tapper_p50_over_rag": {}}
    for c in levels:
        tp, bp, rp = by[("tapper", c)]["p50_ms"], by[("base", c)]["p50_ms"], by[("rag", c)]["p50_ms"]
        t["tapper_p50_over_base"][str(c)] = round(tp / bp, 3)
        t["tapper_p50_over_rag"][str(c)] = round(tp / rp, 3)
    t["p50_vs_base_met (<= 1.1)"] = all(v <= 1.1 for v in t["tapper_p50_over_base"].values())
    t["p50_vs_rag_met (<= 0.5)"] = all(v <= 0.5 for v in t["tapper_p50_over_rag"].values())
    if ("tapper", 1) in by and ("tapper", 8) in by:
        t["tapper_throughput_c8_over_c1"] = round(
            by[("tapper", 8)]["throughput_rps"] / by[("tapper", 1)]["throughput_rps"], 3
        )
        t["throughput_met (>= 3)"] = t["tapper_throughput_c8_over_c1"] >= 3
    if result.get("feedback"):
        t["p99_with_feedback_over_without"] = result["feedback"]["p99_ratio"]
        t["feedback_p99_met (<= 2)"] = result["feedback"]["p99_ratio"] <= 2
    return t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", default="tiny,smollm2")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--requests", default="24,64,128", help="requests per concurrency level (bounded by --max-seconds)")
    p.add_argument("--max-seconds", type=float, default=90.0, help="time bound of each run")
    p.add_argument("--feedback-concurrency", type=int, default=8)
    p.add_argument("--feedback-requests", type=int, default=96)
    p.add_argument("--feedback-seconds", type=float, default=120.0, help="time bound of each of the two feedback runs")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=4, help="segments per run, the modes taking turns (load drift)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per server (default 1: the CPU is shared with other jobs, and one mode is driven "
        "at a time, so one thread keeps the three comparable)",
    )
    p.add_argument("--work", default=str(Path.home() / ".cache" / "tapper" / "bench-serving"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "serving_cpu.json"))
    args = p.parse_args(argv)
    work = Path(args.work)
    t0, loadavg_start = time.time(), [round(x, 2) for x in os.getloadavg()]
    results = [bench_backbone(b, args, work) for b in args.backbones.split(",")]
    import torch

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(
        subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    )
    write_results(
        Path(args.out),
        "serving.py",
        argv,
        results,
        torch=torch.__version__,
        torch_threads=args.threads,
        loadavg_start=loadavg_start,
        loadavg_end=[round(x, 2) for x in os.getloadavg()],
        wall_s=round(time.time() - t0),
        commit=commit,
        uncommitted_changes=dirty,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
