"""Prometheus metrics of one server, in its own registry (so several apps in one process,
as in tests, never collide)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "yunque_requests", "Requests answered, by route and status", ["route", "status"], registry=r
        )
        self.prompt_tokens = Counter("yunque_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter("yunque_completion_tokens", "Tokens generated", registry=r)
        self.latency = Histogram(
            "yunque_request_latency_seconds",
            "Time from request to last byte, by route",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "yunque_time_to_first_token_seconds",
            "Time from request to the first generated text",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("yunque_queue_depth", "Sequences waiting for a batch row", registry=r)
        self.running = Gauge("yunque_running_sequences", "Sequences in the running batch", registry=r)
        self.rejections = Counter("yunque_rejections", "Requests refused, by reason", ["reason"], registry=r)
        self.guard = Counter(
            "yunque_guard_verdicts", "Guard verdicts, by guard and verdict", ["guard", "verdict"], registry=r
        )
        self.cancelled = Counter(
            "yunque_cancelled_sequences", "Generations stopped because the client went away", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
