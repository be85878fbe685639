"""Running the serving application from the command line: start or join Ray, deploy, wait for a signal."""

from __future__ import annotations

import os
import signal
import threading

import ray
from ray import serve

from llm_platform.cluster import LOCAL_SYSTEM_CONFIG
from llm_platform.serving.config import ServeConfig
from llm_platform.serving.cpu_cores import keep_serving_off_engine_cores, own_cluster, record_node_cpus
from llm_platform.serving.secrets import Secrets

APP_NAME = "llm-platform"


def serve_forever(config: ServeConfig, metrics_port: int | None = None) -> None:
    """Deploy ``config`` and block until SIGINT or SIGTERM, then shut down cleanly."""
    from llm_platform.serving.app import build, prepare

    config = prepare(config)
    started_here = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    init = {"_metrics_export_port": metrics_port} if metrics_port and started_here else {}
    if started_here:  # Ray's usual dashboard port, or a free one when another cluster on this host holds it
        init["dashboard_port"] = _port_or_free(8265)
        init["_system_config"] = LOCAL_SYSTEM_CONFIG  # its workers at the machine's normal priority (see there)
        record_node_cpus()
    context = ray.init(**init, logging_level="WARNING")
    secrets = Secrets.from_environment()
    if config.allow_unauthenticated_admin and "LLMP_ADMIN_KEY" not in secrets:
        print(f"WARNING: allow_unauthenticated_admin is on and no LLMP_ADMIN_KEY is set: anyone who reaches "
              f"{config.host}:{config.port} can register and delete adapters. For local experiments only.",
              flush=True)
    # After ray.init: Ray's core worker installs its own SIGTERM handler, which aborts the process.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        print(f"deploying {', '.join(m.id for m in config.models)} ...", flush=True)
        serve.run(build(config, secrets), name=APP_NAME, route_prefix="/")
        if started_here:  # this cluster serves alone: every process of it but vLLM's CPU workers keeps off theirs
            keep_serving_off_engine_cores(own_cluster())
        print(f"serving on http://{config.host}:{config.port}/v1 (Ctrl-C to stop)", flush=True)
        for line in monitoring_lines(context, metrics_port if started_here else None):
            print(line, flush=True)
        stop.wait()
        print("shutting down", flush=True)
    finally:
        serve.shutdown()
        if started_here:
            ray.shutdown()


def _port_or_free(port: int) -> int:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def monitoring_lines(context, metrics_port: int | None) -> list[str]:
    """Where an operator looks: the Ray dashboard (Serve view), Prometheus metrics, the Grafana dashboard JSON."""
    from llm_platform.serving.monitoring import write_dashboard

    lines = []
    dashboard = getattr(context, "dashboard_url", None)
    if dashboard:
        lines.append(f"Ray dashboard: http://{dashboard}/#/serve")
    if metrics_port:
        lines.append(f"Prometheus metrics: http://127.0.0.1:{metrics_port}/metrics (ray_llmp_*, ray_vllm_*)")
    else:
        lines.append("Prometheus metrics: on each Ray node's metrics export port (ray_llmp_*, ray_vllm_*)")
    try:
        lines.append(f"Grafana dashboard JSON: {write_dashboard()} (Grafana: Dashboards > New > Import)")
    except Exception as exc:  # joined a remote cluster: no local session folder
        lines.append(f"Grafana dashboard JSON: not written ({exc}); `python -c 'from llm_platform.serving."
                     f"monitoring import write_dashboard; print(write_dashboard(\".\"))'` writes it here")
    return lines
