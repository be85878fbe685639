"""What a serving application runs: which base models, on which engine, with what resources."""

from __future__ import annotations

from pydantic import Field, model_validator

from llm_platform.config import FrozenConfig
from llm_platform.engine import EngineConfig


class Autoscaling(FrozenConfig):
    """Serve autoscaling bounds for one model deployment."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(16, gt=0)
    """Requests in flight per replica that Serve aims for when scaling."""


class ModelSpec(FrozenConfig):
    """One base model behind the endpoint: one Serve deployment of its own."""

    id: str = Field(pattern=r"^[A-Za-z0-9][\w.-]{0,63}$")
    """The name clients put in "model" (adapters are addressed as ID:ADAPTER)."""
    engine: EngineConfig
    num_replicas: int = Field(1, ge=1)
    """Fixed replica count (ignored when autoscaling is set)."""
    autoscaling: Autoscaling | None = None
    num_cpus: float = Field(1.0, ge=0)
    """CPUs reserved per replica."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs reserved per replica (set tensor_parallel_size in engine to match)."""
    max_adapters: int = Field(8, ge=1)
    """Adapters kept loaded per replica; the least recently used one is evicted."""
    max_ongoing_requests: int = Field(64, ge=1)
    """Requests one replica accepts at once before Serve queues or rejects (503)."""
    stream_batching_interval_ms: float = Field(50.0, ge=0)
    """Streamed responses: the shortest time between two messages of one stream from the replica to the
    ingress (as Ray Serve LLM's ``stream_batching_interval_ms``). A piece goes at once when the stream's
    last message left longer ago; otherwise it waits and goes with every piece ready by then. The client
    still gets one server-sent event per piece. 0: no wait (pieces already ready still go together)."""
    stream_messages_per_s: float = Field(100.0, ge=0)
    """Streamed responses: one replica's budget of messages per second over all its streams. With many
    streams at once each stream's interval grows to streams / this (at most 1 s), since every message
    costs the replica, the ingress and the proxy CPU that a small node takes from the engine. 0: no
    budget (the interval above only)."""

    @model_validator(mode="after")
    def _gpus_fit_tensor_parallelism(self) -> ModelSpec:
        tp = self.engine.tensor_parallel_size
        if tp > 1 and self.num_gpus < tp:
            raise ValueError(f"model {self.id}: tensor_parallel_size {tp} needs num_gpus >= {tp} (got {self.num_gpus})")
        on_gpu = self.engine.device.startswith("cuda")
        if self.engine.kind == "transformers" and (self.num_gpus > 0) != on_gpu:
            # vLLM picks its platform itself; the transformers engine runs where engine.device says.
            raise ValueError(f"model {self.id}: engine.device {self.engine.device!r} with num_gpus {self.num_gpus}: "
                             f"a transformers engine with a GPU needs engine.device: cuda, one without needs cpu")
        return self


class Limits(FrozenConfig):
    """Bounds on what one client can make the server read, copy or hold."""

    max_request_bytes: int = Field(8 * 2**20, ge=1024)
    """Largest request body accepted (413 above it); checked before the body is parsed."""
    max_adapter_bytes: int = Field(2 * 2**30, ge=1)
    """Largest adapter file (adapter_config.json, adapter_model.safetensors) copied at registration.
    A rank-64 LoRA on every linear layer of a 70B model is about 1.7 GB in bfloat16."""
    max_soft_prompt_tokens: int = Field(512, ge=1)
    """Most virtual tokens a soft prompt may have (it is prepended to every prompt it serves)."""


class ServeConfig(FrozenConfig):
    models: list[ModelSpec] = Field(min_length=1)
    """The base models served."""
    adapter_store: str = "artifacts/adapter_store"
    """Folder or object-store URI (s3://, gs://) where registered adapters are kept across restarts."""
    build_tiny_models: str | None = None
    """If set, build the tiny models into this folder first when they are missing."""
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    adapter_sync_s: float = Field(1.0, gt=0)
    """How often replicas check the store for replaced or deleted adapters."""
    ingress_max_ongoing_requests: int = Field(1024, ge=1)
    """Requests the ingress relays at once. It only routes, so it must not be the bottleneck
    (Serve's default of 5 would cap the whole endpoint at 5 concurrent requests)."""
    max_queued_requests: int = Field(256, ge=-1)
    """Requests waiting for a replica before new ones get 503 (-1: unbounded)."""
    max_queue_wait_s: float = Field(30.0, gt=0)
    """Longest a request waits in Serve's router for a model replica to take it (all busy, or none
    running while a replica is replaced or scales up from zero); past it the client gets 503 with
    Retry-After. Only the wait for a replica is bounded: a request a replica has taken runs to the end."""
    adapter_sources: list[str] = []
    """Where adapters may be registered from: local folders (a source must lie inside one) and
    object-store URI prefixes (``s3://bucket/prefix``). A prefix may carry the store's options
    (``?endpoint_override=host:port&scheme=http``); a source may not (the server would call any
    host a client names). Empty: every registration is refused."""
    allow_unauthenticated_admin: bool = False
    """Let anyone who reaches the port register and delete adapters when no LLMP_ADMIN_KEY is set.
    For local experiments only; logged as a warning at start. Otherwise admin routes answer 403."""
    limits: Limits = Limits()
    health_check_period_s: float = Field(5.0, gt=0)
    """How often Serve asks each model replica whether its engine is alive (a dead one is replaced)."""

    @model_validator(mode="after")
    def _unique_ids(self) -> ServeConfig:
        ids = [m.id for m in self.models]
        if len(set(ids)) != len(ids):
            raise ValueError(f"model ids must be unique, got {ids}")
        return self
