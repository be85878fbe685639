"""Ray Serve entry point of the OpenAI-compatible server (the application is ``llm_platform.serving.app``).

    llmp serve --config serve_apps/configs/local.yaml          # blocks until Ctrl-C / SIGTERM
    serve run serve_apps.openai_app:build_app config=serve_apps/configs/local.yaml

or in a Serve config file: ``applications: - import_path: serve_apps.openai_app:build_app, args: {config: ...}``.
"""

from llm_platform.serving.app import build_app

__all__ = ["build_app"]
