"""The one shape of every training job: prepare → check inputs → check resumable → fit → outputs →
publish → register.

SFT, the reward model, DPO, PPO and each Tune trial are a :class:`Job`: what differs is the config
class, how inputs are checked and what the Ray Train workers run. Where the run happens (a local Ray
cluster, or the cluster of ``ray job submit``), where its outputs go (a folder or ``s3://``, see
:mod:`llm_platform.training.outputs`), whether it resumes, and registering its adapter are decided here,
once. The launched scripts in ``train_jobs/`` only call :func:`cli`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from llm_platform import console
from llm_platform.errors import PlatformError


def _unchanged(cfg):
    return cfg


def _nothing(cfg) -> None:
    return None


@dataclass(frozen=True)
class Job:
    name: str
    """The entry point's module under ``train_jobs`` (``python -m train_jobs.NAME``)."""
    config: type
    """The job's pydantic config class (``output_dir``, ``storage_path``, ``run_name``, ``scaling``, ``tracking``)."""
    train: Callable[[Any, Path | None], None]
    """What each Ray Train worker runs: ``train(cfg, folder)``. ``folder`` is the local folder rank 0 writes
    its outputs into (``summary.json`` with ``output`` naming the weights' subfolder); None on other ranks."""
    example_config: str
    prepare: Callable[[Any], Any] = _unchanged
    """The config with local paths absolute (workers run elsewhere) and the tiny models built if named."""
    check_inputs: Callable[[Any], None] = _nothing
    """Fail in seconds, before any worker starts, on a wrong model path or dataset."""
    settings: Callable[[Any], dict] | None = None
    """What a checkpoint depends on: a rerun under the same ``run_name`` resumes only with the same."""
    adapter_kind: Callable[[Any], str] | None = None
    """What ``register_url`` registers (``lora``, ``soft_prompt``); None for jobs that do not register."""
    actors: Callable[[Any], Any] | None = None
    """Ray actors the workers use (PPO's rollout pool), started by the driver before ``fit``: they start while
    Ray Train starts its workers. Handed to ``train(cfg, folder, actors)``; their ``shutdown()`` is called
    when the run ends, however it ends."""


def run(job: Job, cfg, callbacks: list | None = None, prepared: bool = False) -> dict:
    """Run ``job`` on Ray Train and return its summary, also written to ``OUTPUT_DIR/summary.json``.
    ``callbacks``: Ray Train callbacks (a Tune trial's report callback); ``prepared``: the caller has run
    ``prepare`` and ``check_inputs`` already (a Tune search does, once for all its trials)."""
    if not prepared:  # before the imports below (torch, Ray: seconds), so that a wrong input fails at once
        cfg = job.prepare(cfg)
        job.check_inputs(cfg)
    from llm_platform.cluster import connect
    from llm_platform.training.checkpoint import stored_settings
    from llm_platform.training.launch import fit, storage_for
    from llm_platform.training.outputs import JobOutputs, register_adapter
    from llm_platform.training.tracking import check_tracking

    check_tracking(cfg.tracking)
    outputs = JobOutputs.create(cfg.output_dir)
    actors = None
    try:
        outputs.write_text("config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        storage = storage_for(cfg.storage_path, outputs.output_dir)
        if job.settings is not None:
            check_resumable(storage, cfg.run_name, job.settings(cfg), stored_settings(storage, cfg.run_name))
        if job.actors is not None:
            connect()
            actors = job.actors(cfg)
        fit(partial(_worker, job), {"config": cfg.model_dump(), "outputs": outputs.as_dict(), "actors": actors},
            cfg.scaling, cfg.run_name, storage, callbacks)
        summary = outputs.read_json("summary.json")
        summary["output"] = outputs.location(summary["output"])  # published: where every node can read it
        if getattr(cfg, "register_url", None):
            card = register_adapter(cfg.register_url, cfg.register_name or cfg.run_name, cfg.register_base,
                                    job.adapter_kind(cfg), summary["output"])
            summary["registered_as"] = card.get("id")
        outputs.write_json("summary.json", summary)
    finally:
        if actors is not None:
            actors.shutdown()
        outputs.finish()
    return summary


def _worker(job: Job, loop_config: dict) -> None:
    """Each Ray Train worker: the job's training, then rank 0 publishes what it wrote."""
    import ray.train

    from llm_platform.training.outputs import JobOutputs

    cfg = job.config.model_validate(loop_config["config"])
    outputs = JobOutputs(**loop_config["outputs"])
    main = ray.train.get_context().get_world_rank() == 0
    folder = outputs.worker_folder() if main else None
    job.train(cfg, folder, *(() if job.actors is None else (loop_config["actors"],)))
    if main:
        outputs.publish(folder)


def check_resumable(storage: str, run_name: str, settings: dict, stored: dict | None) -> None:
    """A run name already in storage resumes (Ray Train restores its last checkpoint), but only with the
    same training settings: resuming a different run from it would silently mix the two."""
    if stored is None:
        return
    changed = sorted(k for k in settings.keys() | stored.keys() if stored.get(k) != settings.get(k))
    if changed:
        raise PlatformError(f"run {run_name!r} in {storage} has a checkpoint from other settings (changed: "
                            f"{', '.join(changed)}); choose another run_name to start afresh, or delete "
                            f"{storage}/{run_name}")
    print(f"resuming run {run_name!r} from its last checkpoint", flush=True)


def cli(job: Job, doc: str, argv: list[str] | None = None) -> int:
    """``python -m train_jobs.NAME --config FILE [key=value ...]``: run the job, print its summary."""
    from llm_platform.config import load_config

    parser = argparse.ArgumentParser(prog=f"python -m train_jobs.{job.name}", description=doc.splitlines()[0])
    parser.add_argument("--config", required=True, help=f"YAML config, e.g. {job.example_config}")
    parser.add_argument("overrides", nargs="*", help="key=value settings, e.g. optim.max_steps=50")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="show the Ray workers' and vLLM's own output too (LLMP_LOG_LEVEL=INFO); by default the "
                             "console shows progress lines and the workers' output stays in Ray's session logs")
    args = parser.parse_args(argv)
    console.setup(verbose=args.verbose)
    try:
        summary = run(job, load_config(job.config, args.config, args.overrides))
    except PlatformError as exc:
        print(f"{job.name}: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0
