"""Prometheus metrics of the API server, named like vLLM's (`vicuna:` instead of `vllm:`, label
`model_name`) so existing dashboards translate.

Latencies are measured in the API process with a monotonic clock from the arrival of the request,
so TTFT includes dispatch, queueing and prefill. Running/waiting come from the workers' last
heartbeats (via the controller) at scrape time. Each app has its own registry, so several servers
can live in one process (tests).
"""

from __future__ import annotations

import time
from typing import Any

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class ApiMetrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        label = ["model_name"]
        self.ttft = Histogram("vicuna:time_to_first_token_seconds", "Time from request arrival to the first token.",
                              label, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("vicuna:inter_token_latency_seconds", "Time between two output tokens.",
                             label, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("vicuna:e2e_request_latency_seconds", "Time from arrival to the last token.",
                             label, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter("vicuna:prompt_tokens", "Prompt tokens processed.", label, registry=self.registry)
        self.generation_tokens = Counter("vicuna:generation_tokens", "Tokens generated.", label, registry=self.registry)
        self.success = Counter("vicuna:request_success", "Finished requests by finish reason.",
                               label + ["finished_reason"], registry=self.registry)
        self.errors = Counter("vicuna:request_errors", "Requests that failed, by HTTP status.",
                              label + ["status"], registry=self.registry)
        self.running = Gauge("vicuna:num_requests_running", "Requests being generated (worker heartbeats).",
                             label, registry=self.registry)
        self.waiting = Gauge("vicuna:num_requests_waiting", "Requests queued at workers (worker heartbeats).",
                             label, registry=self.registry)
        self.workers = Gauge("vicuna:num_workers", "Live workers serving the model.", label, registry=self.registry)

    def set_load(self, workers: list[dict[str, Any]]) -> None:
        """Gauges from the controller's worker list: a worker's counts go to each of its models
        (a worker serving several models reports them together)."""
        totals: dict[str, list[float]] = {}
        for worker in workers:
            for model in worker.get("models", []):
                row = totals.setdefault(model["name"], [0, 0, 0])
                row[0] += worker.get("running", 0)
                row[1] += worker.get("waiting", 0)
                row[2] += 1
        for gauge in (self.running, self.waiting, self.workers):
            gauge.clear()
        for model, (running, waiting, count) in totals.items():
            self.running.labels(model).set(running)
            self.waiting.labels(model).set(waiting)
            self.workers.labels(model).set(count)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTimer:
    """Per-request timing: call `tokens(n)` as output arrives, `finish(...)` once."""

    def __init__(self, metrics: ApiMetrics, model: str):
        self.metrics, self.model = metrics, model
        self.start = time.monotonic()
        self.last: float | None = None
        self.first_token: float | None = None

    def tokens(self, count: int) -> None:
        if count <= 0:
            return
        now = time.monotonic()
        if self.last is None:
            self.first_token = now - self.start
            self.metrics.ttft.labels(self.model).observe(self.first_token)
            count -= 1  # the first token has no gap before it
        elif count:
            gap = (now - self.last) / count
            for _ in range(count):
                self.metrics.itl.labels(self.model).observe(gap)
        self.last = now

    def finish(self, reasons: list[str | None], prompt_tokens: int, completion_tokens: int) -> None:
        m = self.metrics
        m.e2e.labels(self.model).observe(time.monotonic() - self.start)
        m.prompt_tokens.labels(self.model).inc(prompt_tokens)
        m.generation_tokens.labels(self.model).inc(completion_tokens)
        for reason in reasons:
            m.success.labels(self.model, reason or "unknown").inc()

    def failed(self, status: int) -> None:
        self.metrics.errors.labels(self.model, str(status)).inc()
