"""Joining or starting the Ray cluster a command runs on.

Under ``ray job submit`` (or with ``RAY_ADDRESS`` set) a command joins that cluster. Otherwise it
starts a local one, and that cluster's processes are told where its own state API is.

Why that matters: Ray Train's ``PlacementGroupCleaner`` (a detached actor) asks the state API
whether the run's controller is still alive, and finds the API by auto-detection: ``RAY_ADDRESS``,
else the *most recently started* cluster on the machine. With two local clusters (a server and a
training job, say) it asks the wrong one, which knows no such controller, and frees the placement
group of a live run: its workers die mid-training ("worker health check failed"). Pointing every
process of the cluster at its own dashboard (``RAY_API_SERVER_ADDRESS``) removes the guess.

What reaches the console follows ``llm_platform.console``: quietly (the default) workers' output
stays in the cluster's log files and only the platform's progress lines come through its relay.
"""

from __future__ import annotations

import json
import os
import socket

import ray

from llm_platform import console
from llm_platform.storage import storage_env

API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
LOCAL_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
"""Ray Train settings for a cluster that :func:`connect` starts on this machine (see there)."""
LOCAL_SYSTEM_CONFIG = {"worker_niceness": 0}
"""Ray settings for a cluster the platform starts on this machine (:func:`connect`, and `llmp serve`'s
launcher). Ray starts its workers at niceness
15 so that its own daemons stay responsive on a node the workers saturate; on one machine the workers are the
work (vLLM's engines, the serving path, training) and at 15 they lose the CPU to every other process that
wants it: a load generator, a shell, the driver. Ray's job manager starts job drivers at 0 the same way.
Measured with ``llmp bench serve --stream --clients 32`` (README, Serving)."""


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def connect(num_cpus: int | None = None, log_to_driver: bool | None = None, logging_level: str | None = None,
            env_vars: dict[str, str] | None = None, relay_progress: bool = True) -> None:
    """Join ``RAY_ADDRESS``'s cluster, or start a local one (``num_cpus`` logical CPUs, default: the
    cores) with a dashboard on a free port that its processes use as their state API. ``env_vars`` go
    to every worker of this driver. ``log_to_driver`` and ``logging_level`` default to the console
    level (quiet: workers' output stays in log files; verbose: forwarded). With ``relay_progress``
    the workers' progress lines (``console.progress``) are printed here. A no-op when Ray is
    already initialised."""
    if ray.is_initialized():
        return
    lvl = console.level()
    log_to_driver = lvl is not None if log_to_driver is None else log_to_driver
    logging_level = logging_level or (lvl if lvl in ("DEBUG", "INFO") else "WARNING")
    relay = console.relay_env() if relay_progress else {}
    # Where s3:// points and the keys that open it (llm_platform.storage.STORAGE_ENV), as this driver has
    # them: workers on other nodes see only their own node's environment. With instance profiles (the
    # cluster.yaml default) there are no keys to forward; keys set here are visible in the job's runtime
    # environment on the dashboard, like any env var passed to Ray.
    env = {**console.library_env(), **relay, **storage_env(), **(env_vars or {})}
    # Under `ray job submit --runtime-env-json '{"env_vars": ...}'` those variables already reach every
    # worker of the job, and Ray refuses to merge a ray.init runtime_env that names any of them again.
    job_env = _job_env_vars()
    env = {key: value for key, value in env.items() if key not in job_env}
    if os.environ.get("RAY_ADDRESS"):
        context = ray.init(log_to_driver=log_to_driver, logging_level=logging_level,
                           runtime_env={"env_vars": env})
    else:
        # Ray Train reads these from the driver's environment when a run starts and hands them to its
        # controller. On a cluster of one machine nothing is preempted, and a controller that asks its few
        # workers how they are every 0.2 s instead of 2 s notices a started, finished or failed worker
        # group sooner: a 2-step LoRA SFT job on tiny-s took 10.5 s instead of 14.5 s (2 cores, three runs
        # each). Left at Ray's defaults on real clusters, where many workers make a frequent poll costly.
        for name, value in LOCAL_TRAIN_ENV.items():
            os.environ.setdefault(name, value)
        port = free_port()
        api = f"http://127.0.0.1:{port}"
        context = ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                           dashboard_port=port, log_to_driver=log_to_driver, logging_level=logging_level,
                           runtime_env={"env_vars": {**env, API_SERVER_ENV: api}}, _system_config=LOCAL_SYSTEM_CONFIG)
    if relay:
        console.start_relay(relay[console.RELAY_ENV], context.address_info.get("session_dir"))


def _job_env_vars() -> dict[str, str]:
    """The ``env_vars`` of the job's runtime environment when this driver runs under ``ray job submit``
    (Ray's job supervisor hands the job's config to the driver in an environment variable)."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    raw = os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR)
    return ((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}) if raw else {}


def shutdown() -> None:
    """Print the last progress lines, then leave (or stop) the cluster."""
    console.stop_relay()
    ray.shutdown()
