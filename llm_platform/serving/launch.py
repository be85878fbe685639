"""Running the serving application from the command line: start or join Ray, deploy, wait for a signal."""

from __future__ import annotations

import os
import signal
import threading

import ray
from ray import serve

from llm_platform.serving.config import ServeConfig

APP_NAME = "llm-platform"


def serve_forever(config: ServeConfig, metrics_port: int | None = None) -> None:
    """Deploy ``config`` and block until SIGINT or SIGTERM, then shut down cleanly."""
    from serve_apps.openai_app import build, prepare

    config = prepare(config)
    started_here = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    init = {"_metrics_export_port": metrics_port} if metrics_port and started_here else {}
    ray.init(**init, logging_level="WARNING")
    # After ray.init: Ray's core worker installs its own SIGTERM handler, which aborts the process.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        print(f"deploying {', '.join(m.id for m in config.models)} ...", flush=True)
        serve.run(build(config), name=APP_NAME, route_prefix="/")
        print(f"serving on http://{config.host}:{config.port}/v1 (Ctrl-C to stop)", flush=True)
        stop.wait()
        print("shutting down", flush=True)
    finally:
        serve.shutdown()
        if started_here:
            ray.shutdown()
