"""The LoRA rank × learning-rate search on Ray Tune (Optuna + ASHA) with SFT trials on Ray Train,
run as users run it: ``python -m tune_spaces.lora_rank_lr`` in its own process and local Ray cluster."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "tune_spaces" / "configs" / "local.yaml"


@pytest.mark.slow
def test_search_stops_bad_trials_and_keeps_the_best_adapter(tiny_models, tmp_path):
    from peft import PeftConfig

    overrides = [f"sft_overrides=[model={tiny_models['tiny-s']}, data.eval_limit=32]", "num_samples=6",
                 "max_steps=24", "eval_every=4", "grace_period=4", "lr_min=1e-5", "lr_max=2e-2",
                 f"output_dir={tmp_path}"]
    run = subprocess.run([sys.executable, "-m", "tune_spaces.lora_rank_lr", "--config", str(CONFIG), *overrides],
                         capture_output=True, text=True, timeout=900, cwd=REPO)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert len(re.findall(r"^trial \d/6 ", run.stdout, re.M)) == 6  # a progress line per trial
    summary = json.loads((tmp_path / "summary.json").read_text())
    with (tmp_path / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == summary["trials"] == 6
    assert len({r["rank"] for r in rows}) > 1 and len({r["learning_rate"] for r in rows}) > 1
    assert all(int(r["alpha"]) == 2 * int(r["rank"]) for r in rows)
    stopped = [r for r in rows if r["stopped_early"] == "True"]
    assert stopped and all(int(r["steps"]) < 24 for r in stopped)
    assert summary["trial_steps_run"] == sum(int(r["steps"]) for r in rows) < summary["trial_steps_full"] == 6 * 24
    completed = [r for r in rows if r["stopped_early"] == "False"]
    best = min(completed, key=lambda r: float(r["eval_loss"]))
    assert summary["best_config"]["rank"] == int(best["rank"])
    assert PeftConfig.from_pretrained(tmp_path / "best_adapter").r == int(best["rank"])
    assert (tmp_path / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["baseline"]["steps"] == 24 and "best_beats_baseline" in summary
