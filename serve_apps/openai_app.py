"""The OpenAI-compatible serving application: one deployment per base model behind one ingress.

    llmp serve --config serve_apps/configs/local.yaml          # blocks until Ctrl-C / SIGTERM
    serve run serve_apps.openai_app:build_app config=serve_apps/configs/local.yaml

`build_app` takes the same arguments under `llmp serve`, `serve run` and a Serve
config file (`applications: - import_path: serve_apps.openai_app:build_app, args: {config: ...}`).
"""

from __future__ import annotations

import os
from pathlib import Path

from ray import serve
from ray.serve import Application

from llm_platform.config import load_config
from llm_platform.serving.config import ModelSpec, ServeConfig
from llm_platform.serving.ingress import Ingress
from llm_platform.serving.model_server import ModelServer
from llm_platform.storage import storage_env

SECRETS = ("LLMP_API_KEY", "LLMP_ADMIN_KEY")


def model_deployment(spec: ModelSpec, config: ServeConfig) -> Application:
    scaling = {"autoscaling_config": spec.autoscaling.model_dump()} if spec.autoscaling else \
        {"num_replicas": spec.num_replicas}
    deployment = serve.deployment(ModelServer).options(
        name=f"model-{spec.id}", max_ongoing_requests=spec.max_ongoing_requests,
        max_queued_requests=config.max_queued_requests,
        ray_actor_options={"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus, **_env_vars(storage_env())},
        health_check_period_s=10, health_check_timeout_s=60, **scaling)
    return deployment.bind(spec.model_dump(), config.adapter_store, config.adapter_sync_s)


def _env_vars(env: dict[str, str]) -> dict:
    """Replicas may run on other nodes: they get the store's endpoint and keys as set here (see storage.py)."""
    return {"runtime_env": {"env_vars": env}} if env else {}


def build(config: ServeConfig) -> Application:
    """The application graph: Ingress → {model id: ModelServer deployment}."""
    models = {spec.id: model_deployment(spec, config) for spec in config.models}
    secrets = {**storage_env(), **{k: os.environ[k] for k in SECRETS if os.environ.get(k)}}
    ingress = Ingress.options(max_ongoing_requests=config.ingress_max_ongoing_requests,
                              ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": secrets}})
    return ingress.bind(models, [s.model_dump() for s in config.models], config.adapter_store,
                        config.adapter_sync_s)


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
    return config.model_copy(update={"models": models, "adapter_store": store})


def _absolute(name: str) -> str:
    return str(Path(name).resolve()) if Path(name).exists() else name
