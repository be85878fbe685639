"""The platform's own metrics, exported through Ray so they sit beside Serve's in the dashboard
and on each node's Prometheus endpoint (names prefixed ``ray_llmp_``)."""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]


class ServingMetrics:
    def __init__(self):
        self.requests = Counter("llmp_requests", "Requests by model and outcome",
                                tag_keys=("model", "adapter_kind", "status"))
        self.generated_tokens = Counter("llmp_generated_tokens", "Tokens generated", tag_keys=("model",))
        self.ttft = Histogram("llmp_time_to_first_token_seconds", "Seconds from request to first token",
                              boundaries=TTFT_BUCKETS, tag_keys=("model",))
        self.adapter_events = Counter("llmp_adapter_events", "Adapter loads, evictions and cache hits per replica",
                                      tag_keys=("model", "event"))
        self.engine_unfinished = Gauge("llmp_engine_requests", "Requests the replica's engine holds (queued or running)",
                                       tag_keys=("model",))

    def request(self, model: str, adapter_kind: str, status: str) -> None:
        self.requests.inc(1, {"model": model, "adapter_kind": adapter_kind, "status": status})

    def tokens(self, model: str, count: int) -> None:
        if count:
            self.generated_tokens.inc(count, {"model": model})

    def first_token(self, model: str, seconds: float) -> None:
        self.ttft.observe(seconds, {"model": model})

    def adapter(self, model: str, event: str) -> None:
        self.adapter_events.inc(1, {"model": model, "event": event})

    def engine_requests(self, model: str, count: int) -> None:
        self.engine_unfinished.set(count, {"model": model})
