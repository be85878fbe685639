"""The OpenAI-compatible serving application: one deployment per base model behind one ingress.

    llmp serve --config serve_apps/configs/local.yaml          # blocks until Ctrl-C / SIGTERM
    serve run serve_apps.openai_app:build_app config=serve_apps/configs/local.yaml

(``serve_apps/openai_app.py`` is the launched entry point; the application lives here.) `build_app` takes the same arguments under `llmp serve`, `serve run` and a Serve
config file (`applications: - import_path: serve_apps.openai_app:build_app, args: {config: ...}`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ray import serve
from ray.serve import Application

from llm_platform.config import load_config
from llm_platform.serving.config import ModelSpec, ServeConfig
from llm_platform.serving.ingress import Ingress
from llm_platform.serving.model_server import ModelServer
from llm_platform.serving.secrets import Secrets

logger = logging.getLogger(__name__)
BACKPRESSURE = {"status_code": 503, "retry_after_s": 1}
"""What Serve answers itself when a queue is full: 503 with Retry-After (its default sends no Retry-After)."""
DRAIN_CHECK_S = 0.5
"""How often a stopping replica counts its requests in flight (Serve's graceful_shutdown_wait_loop_s). Serve
waits one period before the first count, and stops an application's deployments one after the other: at its
default, 2 s, an idle server took 8.4 s to stop (Ingress 2.0 s, then the model 2.0 s, then Ray)."""


def model_deployment(spec: ModelSpec, config: ServeConfig, secrets: Secrets | None = None) -> Application:
    scaling = {"autoscaling_config": spec.autoscaling.model_dump()} if spec.autoscaling else \
        {"num_replicas": spec.num_replicas}
    deployment = serve.deployment(ModelServer).options(
        name=f"model-{spec.id}", max_ongoing_requests=spec.max_ongoing_requests,
        max_queued_requests=config.max_queued_requests, backpressure_config=BACKPRESSURE,
        ray_actor_options={"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus},
        health_check_period_s=config.health_check_period_s, health_check_timeout_s=30,
        graceful_shutdown_wait_loop_s=DRAIN_CHECK_S, **scaling)
    return deployment.bind(spec.model_dump(), config.adapter_store, config.adapter_sync_s, secrets)


def build(config: ServeConfig, secrets: Secrets | None = None) -> Application:
    """The application graph: Ingress → {model id: ModelServer deployment}.

    Keys (LLMP_API_KEY, LLMP_ADMIN_KEY, HF_TOKEN, the storage variables of llm_platform.storage,
    or their *_FILE forms) are read here and passed as constructor arguments: a runtime_env's
    env_vars would show them in Ray's dashboard. Replicas on other nodes export the storage ones."""
    secrets = Secrets.from_environment() if secrets is None else secrets
    models = {spec.id: model_deployment(spec, config, secrets) for spec in config.models}
    ingress = Ingress.options(max_ongoing_requests=config.ingress_max_ongoing_requests,
                              max_queued_requests=config.max_queued_requests,
                              backpressure_config=BACKPRESSURE, ray_actor_options={"num_cpus": 0},
                              graceful_shutdown_wait_loop_s=DRAIN_CHECK_S)
    return ingress.bind(models, [s.model_dump() for s in config.models], config.adapter_store,
                        config.adapter_sync_s, secrets=secrets, adapter_sources=list(config.adapter_sources),
                        allow_unauthenticated_admin=config.allow_unauthenticated_admin,
                        limits=config.limits.model_dump(), max_queue_wait_s=config.max_queue_wait_s)


def build_app(args: dict) -> Application:
    """Serve's entry point: ``args`` holds ``config`` (a YAML path) and optional ``overrides``."""
    config = load_config(ServeConfig, args.get("config"), list(args.get("overrides", [])))
    return build(prepare(config))


def prepare(config: ServeConfig) -> ServeConfig:
    """Build the tiny models first when asked (the embedded default), make local paths absolute (replicas may
    run in another working directory, or on another node), and settle each LoRA-enabled model's unset
    ``max_lora_rank`` from the adapters in the store (:func:`lora_ranks`)."""
    if config.build_tiny_models:
        from llm_platform.models.tiny import build_tiny_models

        build_tiny_models(config.build_tiny_models)
    store = config.adapter_store if "://" in config.adapter_store else str(Path(config.adapter_store).resolve())
    ranks = lora_ranks(config, store)
    models = [spec.model_copy(update={"engine": spec.engine.model_copy(update={
        "model": _absolute(spec.engine.model), "max_lora_rank": ranks.get(spec.id, spec.engine.max_lora_rank)})})
        for spec in config.models]
    sources = [s if "://" in s else str(Path(s).expanduser().resolve()) for s in config.adapter_sources]
    return config.model_copy(update={"models": models, "adapter_store": store, "adapter_sources": sources})


def lora_ranks(config: ServeConfig, store_uri: str) -> dict[str, int]:
    """``max_lora_rank`` for each LoRA-enabled model that leaves it unset: the smallest rank vLLM accepts that
    holds every LoRA adapter registered for it, at least MIN_LORA_RANK. An adapter registered later that needs
    more is refused (422) naming the rank to configure. With the store unreachable: MIN_LORA_RANK, logged."""
    from llm_platform.engine.adapters import lora_rank_of, lora_slot_rank
    from llm_platform.engine.protocol import MIN_LORA_RANK
    from llm_platform.serving.adapter_store import AdapterStore

    unset = {spec.id for spec in config.models if spec.engine.enable_lora and spec.engine.max_lora_rank is None}
    if not unset:
        return {}
    largest = dict.fromkeys(unset, MIN_LORA_RANK)
    try:
        store = AdapterStore(store_uri)
        for entry in store.manifest().values():
            if entry.base in unset and entry.kind == "lora":
                largest[entry.base] = max(largest[entry.base], lora_rank_of(store.adapter_config(entry)))
    except Exception as exc:  # the store is away: bases serve meanwhile, adapters above the floor will not load
        logger.warning("adapter store %s unreadable at start (%s: %s): max_lora_rank %d for %s", store_uri,
                       type(exc).__name__, exc, MIN_LORA_RANK, ", ".join(sorted(unset)))
    ranks = {model: lora_slot_rank(rank) for model, rank in largest.items()}
    for model, rank in sorted(ranks.items()):
        logger.info("model %s: max_lora_rank %d (from the adapters registered for it; floor %d)", model, rank,
                    MIN_LORA_RANK)
    return ranks


def _absolute(name: str) -> str:
    return str(Path(name).resolve()) if Path(name).exists() else name
