"""The platform's own metrics, exported through Ray so they sit beside Serve's and vLLM's in the
dashboard and on each node's Prometheus endpoint (names prefixed ``ray_llmp_``).

Adapters are labelled by name (``adapter``), which clients cannot make unbounded: the
first ``max_adapter_labels`` names a replica sees keep their own label, later ones are
counted as ``other``. Base-model requests carry ``adapter=""``.
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
LATENCY_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
MAX_ADAPTER_LABELS = 64
OTHER = "other"


class ServingMetrics:
    def __init__(self, max_adapter_labels: int = MAX_ADAPTER_LABELS):
        self.requests = Counter("llmp_requests", "Requests by model, adapter and outcome",
                                tag_keys=("model", "adapter", "adapter_kind", "status"))
        self.generated_tokens = Counter("llmp_generated_tokens", "Tokens generated", tag_keys=("model", "adapter"))
        self.ttft = Histogram("llmp_time_to_first_token_seconds", "Seconds from request to first token",
                              boundaries=TTFT_BUCKETS, tag_keys=("model", "adapter"))
        self.e2e = Histogram("llmp_request_seconds", "Seconds from request to its last token (end to end, per replica)",
                             boundaries=LATENCY_BUCKETS, tag_keys=("model", "adapter", "status"))
        self.adapter_events = Counter("llmp_adapter_events", "Adapter loads, evictions and cache hits per replica",
                                      tag_keys=("model", "event"))
        self.engine_unfinished = Gauge("llmp_engine_requests", "Requests the replica's engine holds (queued or running)",
                                       tag_keys=("model",))
        self.max_adapter_labels = max_adapter_labels
        self._labels: set[str] = set()

    def adapter_label(self, name: str) -> str:
        """``name`` itself for the first ``max_adapter_labels`` adapters, then ``other`` (bounded cardinality)."""
        if not name or name in self._labels:
            return name
        if len(self._labels) < self.max_adapter_labels:
            self._labels.add(name)
            return name
        return OTHER

    def request(self, model: str, adapter_kind: str, status: str, adapter: str = "") -> None:
        self.requests.inc(1, {"model": model, "adapter": self.adapter_label(adapter), "adapter_kind": adapter_kind,
                              "status": status})

    def tokens(self, model: str, count: int, adapter: str = "") -> None:
        if count:
            self.generated_tokens.inc(count, {"model": model, "adapter": self.adapter_label(adapter)})

    def first_token(self, model: str, seconds: float, adapter: str = "") -> None:
        self.ttft.observe(seconds, {"model": model, "adapter": self.adapter_label(adapter)})

    def latency(self, model: str, seconds: float, status: str, adapter: str = "") -> None:
        self.e2e.observe(seconds, {"model": model, "adapter": self.adapter_label(adapter), "status": status})

    def adapter(self, model: str, event: str) -> None:
        self.adapter_events.inc(1, {"model": model, "event": event})

    def engine_requests(self, model: str, count: int) -> None:
        self.engine_unfinished.set(count, {"model": model})
