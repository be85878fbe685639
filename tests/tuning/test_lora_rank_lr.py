"""The LoRA rank × learning-rate search on Ray Tune (Optuna + ASHA) with SFT trials on Ray Train,
run as users run it on a cluster: ``python -m tune_spaces.lora_rank_lr`` as a driver of the two-node
cluster (tests/ray_cluster.py: the trials run on the worker node, whose disk the driver cannot see),
with its output_dir (trials, Tune's experiment state, the best adapter) on a real S3 server that only
the driver has the keys of."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llm_platform.serving.process import child_group

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "tune_spaces" / "configs" / "local.yaml"


@pytest.mark.slow
def test_search_stops_bad_trials_resumes_and_keeps_the_best_adapter(ray_cluster, tiny_models, s3, tmp_path):
    """The search's driver is killed after two trials ended (Ray then ends its trials), then started again:
    it resumes, the two ended trials are not run again, and the results cover all six."""
    from peft import PeftConfig

    out = s3.uri("tune")
    command = [sys.executable, "-m", "tune_spaces.lora_rank_lr", "--config", str(CONFIG),
               f"sft_overrides=[model={tiny_models['tiny-s']}, data.eval_limit=32]", "num_samples=6",
               "max_steps=24", "eval_every=4", "grace_period=4", "reduction_factor=2", "lr_min=1e-5", "lr_max=2e-2",
               f"output_dir={out}"]
    env = {**ray_cluster.env, **s3.env}
    started = time.monotonic()
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                             env=env, **child_group(same_session=False))
    ended = []
    for line in first.stdout:
        ended += PROGRESS.findall(line)
        if len(ended) == 2:
            break
    assert len(ended) == 2, "the first run ended before two trials did"
    print(f"two trials ended after {time.monotonic() - started:.1f} s")
    # Its output is still read, so that a full pipe never blocks the driver (and with it Tune's state uploads).
    threading.Thread(target=first.stdout.read, daemon=True).start()
    # Tune uploads its experiment state every 10 s (sync_period): the kill comes once the state in S3 has the two,
    # and 2 s later, for the rest of that upload (the searcher's state beside it) to land.
    deadline = time.monotonic() + 60
    while terminated_in_state(s3, f"{out}/tune") < 2:
        assert time.monotonic() < deadline, "Tune's state in S3 did not list the two ended trials within 60 s"
        time.sleep(1)
    print(f"... and in S3's experiment state after {time.monotonic() - started:.1f} s")
    time.sleep(2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(60)

    started = time.monotonic()
    run = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    print(f"the resumed search took {time.monotonic() - started:.1f} s")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "resuming the search" in run.stdout
    resumed = PROGRESS.findall(run.stdout)  # a progress line per trial that ended in this run
    assert not set(ended) & set(resumed) and len(resumed) <= 4
    summary = json.loads(s3.read(f"{out}/summary.json"))
    rows = list(csv.DictReader(io.StringIO(s3.read(f"{out}/results.csv").decode())))
    assert len(rows) == summary["trials"] == 6 and set(ended) <= {r["trial"] for r in rows}
    assert len({r["rank"] for r in rows}) > 1 and len({r["learning_rate"] for r in rows}) > 1
    assert all(int(r["alpha"]) == 2 * int(r["rank"]) for r in rows)
    stopped = [r for r in rows if r["stopped_early"] == "True"]
    assert stopped and all(int(r["steps"]) < 24 for r in stopped)
    assert summary["trial_steps_run"] == sum(int(r["steps"]) for r in rows) < summary["trial_steps_full"] == 6 * 24
    completed = [r for r in rows if r["stopped_early"] == "False"]
    best = min(completed, key=lambda r: float(r["eval_loss"]))
    assert summary["best_config"]["rank"] == int(best["rank"])
    assert summary["best_adapter"] == f"{out}/best_adapter"
    assert PeftConfig.from_pretrained(s3.download(summary["best_adapter"], tmp_path / "best")).r == int(best["rank"])
    assert s3.read(f"{out}/search.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["baseline"]["steps"] == 24 and "best_beats_baseline" in summary


PROGRESS = re.compile(r"^trial \d/6 (\w+):", re.M)


def terminated_in_state(s3, experiment: str) -> int:
    """How many trials Tune's latest experiment state in ``experiment`` lists as ended (0 before the first)."""
    states = [name for name in s3.listing(experiment) if re.fullmatch(r"experiment_state-[^/]+\.json", name)]
    if not states:
        return 0
    trials = json.loads(s3.read(f"{experiment}/{max(states)}"))["trial_data"]
    return sum(json.loads(trial)["status"] == "TERMINATED" for trial, _ in trials)
