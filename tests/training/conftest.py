"""Helpers to run a training job's main() in-process (on the session's local Ray cluster)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "train_jobs" / "configs"


def run_sft(config: str, model: Path, out: Path, *overrides: str) -> dict:
    """Run ``train_jobs.sft`` with a bundled config on ``model``, writing into ``out``."""
    from llm_platform.config import load_config
    from llm_platform.training.config import SFTConfig
    from llm_platform.training import sft_job as sft

    cfg = load_config(SFTConfig, CONFIGS / config, [f"model={model}", f"output_dir={out}", *overrides])
    return sft.main(cfg)


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@contextlib.contextmanager
def two_at_a_time(jobs: dict[str, Callable[[], object]]) -> Iterator[dict[str, Future]]:
    """Run independent jobs (each on one single-threaded Ray Train worker) in this process's threads, two at a
    time; yield their futures, and wait for all of them on leaving. One such job keeps about 0.7 of this
    machine's two cores busy (measured per test over a whole ``make test``), two together keep both busy. Ray
    Train runs several trainers' ``fit`` from one driver's threads, each waiting on its own controller."""
    with ThreadPoolExecutor(2, thread_name_prefix="job") as pool:
        yield {name: pool.submit(job) for name, job in jobs.items()}
