"""The OpenAI-compatible serving application: one deployment per base model behind one ingress.

    llmp serve --config serve_apps/configs/local.yaml          # blocks until Ctrl-C / SIGTERM
    serve run serve_apps.openai_app:build_app config=serve_apps/configs/local.yaml

(``serve_apps/openai_app.py`` is the launched entry point; the application lives here.) `build_app` takes the same arguments under `llmp serve`, `serve run` and a Serve
config file (`applications: - import_path: serve_apps.openai_app:build_app, args: {config: ...}`).
"""

from __future__ import annotations

from pathlib import Path

from ray import serve
from ray.serve import Application

from llm_platform.config import load_config
from llm_platform.serving.config import ModelSpec, ServeConfig
from llm_platform.serving.ingress import Ingress
from llm_platform.serving.model_server import ModelServer
from llm_platform.serving.secrets import Secrets

BACKPRESSURE = {"status_code": 503, "retry_after_s": 1}
"""What Serve answers itself when a queue is full: 503 with Retry-After (its default sends no Retry-After)."""


def model_deployment(spec: ModelSpec, config: ServeConfig, secrets: Secrets | None = None) -> Application:
    scaling = {"autoscaling_config": spec.autoscaling.model_dump()} if spec.autoscaling else \
        {"num_replicas": spec.num_replicas}
    deployment = serve.deployment(ModelServer).options(
        name=f"model-{spec.id}", max_ongoing_requests=spec.max_ongoing_requests,
        max_queued_requests=config.max_queued_requests, backpressure_config=BACKPRESSURE,
        ray_actor_options={"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus},
        health_check_period_s=config.health_check_period_s, health_check_timeout_s=30, **scaling)
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
                              backpressure_config=BACKPRESSURE, ray_actor_options={"num_cpus": 0})
    return ingress.bind(models, [s.model_dump() for s in config.models], config.adapter_store,
                        config.adapter_sync_s, secrets=secrets, adapter_sources=list(config.adapter_sources),
                        allow_unauthenticated_admin=config.allow_unauthenticated_admin,
                        limits=config.limits.model_dump(), max_queue_wait_s=config.max_queue_wait_s)


def build_app(args: dict) -> Application:
    """Serve's entry point: ``args`` holds ``config`` (a YAML path) and optional ``overrides``."""
    config = load_config(ServeConfig, args.get("config"), list(args.get("overrides", [])))
    return build(prepare(config))


def prepare(config: ServeConfig) -> ServeConfig:
    """Build the tiny models first when asked (the embedded default), and make local paths absolute:
    replicas may run in another working directory, or on another node."""
    if config.build_tiny_models:
        from llm_platform.models.tiny import build_tiny_models

        build_tiny_models(config.build_tiny_models)
    models = [spec.model_copy(update={"engine": spec.engine.model_copy(update={"model": _absolute(spec.engine.model)})})
              for spec in config.models]
    store = config.adapter_store if "://" in config.adapter_store else str(Path(config.adapter_store).resolve())
    sources = [s if "://" in s else str(Path(s).expanduser().resolve()) for s in config.adapter_sources]
    return config.model_copy(update={"models": models, "adapter_store": store, "adapter_sources": sources})


def _absolute(name: str) -> str:
    return str(Path(name).resolve()) if Path(name).exists() else name
