"""Running a training loop on Ray Train: join or start a cluster, build the TorchTrainer, fit.

The same call works on a laptop (a local Ray cluster is started), under
``ray job submit`` (it joins the job's cluster through ``RAY_ADDRESS``) and on a
GPU cluster (``scaling.use_gpu``: NCCL, one GPU per worker). Worker failures restart
the group from the last reported checkpoint, up to ``scaling.max_failures`` times.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import ray
from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
from ray.train.torch import TorchConfig, TorchTrainer

from llm_platform import console
from llm_platform.cluster import connect
from llm_platform.errors import PlatformError
from llm_platform.training.config import ScalingSettings


def storage_for(storage_path: str | None, output_dir: str) -> str:
    """Ray Train's storage: the configured folder or URI, else ``OUTPUT_DIR/ray`` (on the object store when
    ``output_dir`` is a URI: checkpoints written on a worker node must be readable from wherever the group
    restarts); local folders made absolute."""
    location = storage_path or f"{output_dir.rstrip('/')}/ray"
    return location if "://" in location else str(Path(location).expanduser().resolve())


def fit(train_fn: Callable[[dict], None], loop_config: dict, scaling: ScalingSettings, run_name: str,
        storage: str, callbacks: list | None = None) -> ray.train.Result:
    """Run ``train_fn(loop_config)`` on ``scaling.num_workers`` Ray Train workers and wait for it.
    ``callbacks`` are Ray Train callbacks (inside a Tune trial: Tune's report callback)."""
    connect()  # joins RAY_ADDRESS under `ray job submit`, else starts a local cluster
    resources = {"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {})}
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        run_config=RunConfig(name=run_name, storage_path=storage, callbacks=callbacks,
                             failure_config=FailureConfig(max_failures=scaling.max_failures)),
    )
    try:
        return trainer.fit()
    except TrainingFailedError as exc:
        cause = _platform_error(exc)
        if cause is None:
            raise
        raise PlatformError(str(cause)) from exc  # ours says what to change: one line, not Ray's traceback
    finally:
        console.flush_progress()  # the workers' last progress lines, before the caller prints on


def _platform_error(exc: Exception) -> PlatformError | None:
    """The platform's own error raised in a worker (a misconfiguration it explains), if that is what failed."""
    for failure in getattr(exc, "worker_failures", {}).values():
        for candidate in (failure, getattr(failure, "cause", None)):
            if isinstance(candidate, PlatformError):
                return candidate
    return None
