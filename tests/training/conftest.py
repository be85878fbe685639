"""Helpers to run a training job's main() in-process (on the session's local Ray cluster)."""

from __future__ import annotations

import json
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
