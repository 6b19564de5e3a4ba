"""Prometheus metrics of one serving app (`GET /metrics`, text exposition format).

Each app gets its own CollectorRegistry (not prometheus_client's global one), so several apps in one process
(tests, a second replica in a benchmark) never clash on metric names and each /metrics shows only its app.

Label values are bounded: `endpoint` is one of ENDPOINTS or "other" (never the raw path, which a client could
vary at will), `status` an HTTP status code; never a user id.

What the model holds is read at scrape time (ModelCollector), so a gauge is never stale, and it is read from
plain attributes of the loaded object without the service's lock: a scrape must not wait behind a feedback
update or a queue of predictions. A value read while a feedback is applied may be one update behind; that is
what a gauge sampled a moment earlier would show too.
"""

from __future__ import annotations

import time
from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

# Endpoints counted under their own label; anything else (404s, /docs) is "other". /metrics itself is not
# counted: scrapes would otherwise dominate the request counts.
ENDPOINTS = ("/predict", "/v1/completions", "/feedback", "/reload", "/info", "/health")
# Per-user routes are counted under their template: the raw path holds a user id.
USERS_ENDPOINT = "/users/{id}"
# Rows in one prediction batch (deploy.batcher); the top bucket is the largest batch a server may be set to.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# From a cached /health (ms) to a prediction or feedback update on CPU (seconds); /reload of a large backbone
# lands in the top buckets or +Inf.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PROC_STATUS = "/proc/self/status"


class ServingMetrics:
    """The metrics of one app: request counters and latencies, feedback counters, model and memory gauges."""

    def __init__(self, service):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tapper_requests", "HTTP requests answered, by endpoint and status code", ["endpoint", "status"], registry=r
        )
        self.duration = Histogram(
            "tapper_request_duration_seconds",
            "time to answer a request, by endpoint",
            ["endpoint"],
            buckets=BUCKETS,
            registry=r,
        )
        self.feedback_records = Counter(
            "tapper_feedback_records", "records accepted through /feedback by this replica", registry=r
        )
        self.new_users = Counter(
            "tapper_new_users", "users given a new row of the user table by a /feedback to this replica", registry=r
        )
        self.batch_size = Histogram(
            "tapper_batch_size", "predictions per forward pass (micro-batching)", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "tapper_queue_wait_seconds", "time a prediction waited for its batch to start", buckets=BUCKETS, registry=r
        )
        service.batch_listeners.append(self.batch)
        # process_* (CPU seconds, RSS, open fds, start time) and python_info, as every Python exporter has them.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        r.register(ModelCollector(service))
        r.register(MemoryCollector())

    def batch(self, size: int, waits: list[float]) -> None:
        """A prediction batch ran (called by the batch worker)."""
        self.batch_size.observe(size)
        for w in waits:
            self.queue_wait.observe(w)

    def observe(self, path: str, status: int, seconds: float) -> None:
        if path == "/metrics":
            return
        endpoint = path if path in ENDPOINTS else USERS_ENDPOINT if path.startswith("/users/") else "other"
        self.requests.labels(endpoint, str(status)).inc()
        self.duration.labels(endpoint).observe(seconds)

    def feedback(self, result: dict) -> None:
        """Count an answered /feedback (TapperService.feedback's result)."""
        self.feedback_records.inc(result["accepted"])
        report = result.get("report") or {}
        self.new_users.inc(len(report.get("new_users") or ()))

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition (OpenMetrics when the scraper asks for it, else the text format) and its content type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class RequestMetricsMiddleware:
    """Pure ASGI middleware: counts every HTTP request with the status actually sent, including responses made by
    exception handlers (422, 409, 500 for a malformed stored history) and HTTPExceptions (401, 503). An exception
    no handler took is counted as the 500 that Starlette's outermost error middleware then sends.
    Pure ASGI rather than BaseHTTPMiddleware: no extra task per request, the response body is not buffered."""

    def __init__(self, app, metrics: ServingMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe(scope["path"], status, time.perf_counter() - start)


class ModelCollector:
    """Gauges read from the loaded model at scrape time; only `tapper_model_loaded` when none is loaded."""

    def __init__(self, service):
        self.service = service

    def describe(self) -> Iterable[Metric]:
        return []  # names vary with the loaded state; nothing to check against other collectors at registration

    def collect(self) -> Iterable[Metric]:
        svc = self.service
        ld = svc._loaded  # the attribute, not `svc.loaded` (no exception) and not under svc._lock (see module doc)
        yield GaugeMetricFamily(
            "tapper_model_loaded",
            "1 when a model is loaded and served, else 0 (/health is 503)",
            value=0 if ld is None else 1,
        )
        if ld is None:
            return
        info = GaugeMetricFamily(
            "tapper_model_info",
            "the loaded model (value 1); generation is the live feedback "
            "generation, 'none' before the bundle's first feedback",
            labels=["version", "task", "generation"],
        )
        info.add_metric([str(ld.bundle.version), str(ld.task.name), ld.generation or "none"], 1)
        yield info
        yield GaugeMetricFamily(
            "tapper_users", "users with a row in the user table (known users)", value=len(ld.live_users())
        )
        yield GaugeMetricFamily("tapper_users_with_history", "users with a stored history", value=len(ld.histories))
        yield GaugeMetricFamily(
            "tapper_live_sequence",
            "feedback deltas of the live generation applied here "
            "(rises with every feedback to any replica; back to 0 after a compaction)",
            value=ld.sequence,
        )
        yield GaugeMetricFamily(
            "tapper_model_age_seconds", "seconds since the model was (re)loaded", value=time.time() - ld.loaded_at
        )
        yield GaugeMetricFamily(
            "tapper_scratch_dir_enabled",
            "1 when per-user state is on local scratch files (--scratch-dir), else 0",
            value=1 if svc.cfg.scratch_dir is not None else 0,
        )
        yield GaugeMetricFamily("tapper_queue_depth", "predictions waiting for a batch", value=svc.batcher.depth)
        yield CounterMetricFamily(
            "tapper_predictions_dropped",
            "queued predictions dropped because their client had gone",
            value=svc.batcher.stats.dropped,
        )
        c = svc.compactor.stats
        compactions = CounterMetricFamily("tapper_compactions", "snapshot compactions, by result", labels=["result"])
        compactions.add_metric(["done"], c.done)
        compactions.add_metric(["failed"], c.failed)
        yield compactions


def proc_status_memory(path: str = PROC_STATUS) -> dict[str, int]:
    """{"RssAnon": bytes, "RssFile": bytes} from /proc/self/status; {} where there is none (not Linux)."""
    out = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0]) * 1024  # "RssAnon:   123456 kB"
    except OSError:
        return {}
    return out


class MemoryCollector:
    """Resident memory split as the README's serving figures split it: anonymous memory (heap, tensors; what
    --scratch-dir moves per-user state out of) and file-backed pages (mapped files such as the paged user table and
    libraries: page cache the kernel can reclaim). process_resident_memory_bytes is their sum plus RssShmem."""

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        mem = proc_status_memory()
        if "RssAnon" in mem:
            yield GaugeMetricFamily(
                "tapper_process_anonymous_memory_bytes", "resident anonymous memory (RssAnon)", value=mem["RssAnon"]
            )
        if "RssFile" in mem:
            yield GaugeMetricFamily(
                "tapper_process_file_memory_bytes", "resident file-backed memory (RssFile)", value=mem["RssFile"]
            )
