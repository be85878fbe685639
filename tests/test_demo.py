"""What a newcomer sees: `llmp demo --quick` as a subprocess, its console output read line by line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LLMP = Path(sys.executable).with_name("llmp")
# What Ray, Ray Train and vLLM print when left on the console.
NOISE = re.compile(r"WARNING|Warning|\(RayTrainWorker|\(TrainController|\(RolloutWorker|pid=\d+|Reporting training "
                   r"result|TrainingReport|Triton|LD_PRELOAD|NUMA|Token authentication|it/s\]|Traceback")


@pytest.mark.slow
def test_quick_demo_console_is_short_and_the_logs_hold_the_rest(tiny_models, tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("LLMP_LOG_LEVEL", None)
    run = subprocess.run([str(LLMP), "demo", "--quick", f"out={out}", f"models_dir={tiny_models['tiny-s'].parent}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    console = run.stdout + run.stderr
    (tmp_path / "console.txt").write_text(console)  # as the user saw it (kept with pytest's tmp folders)
    assert run.returncode == 0, console[-3000:] + (out / "logs" / "llmp.log").read_text()[-3000:]
    lines = console.splitlines()
    assert 15 < len(lines) < 60, console

    # The platform's progress, each line once: the steps, and one line per logging interval per job.
    content = [line for line in lines if line.strip() and not set(line) <= set("- ")]
    repeated = [line for line, n in Counter(content).items() if n > 1]
    assert not repeated, repeated
    for step in ("[1/5]", "[3/5] SFT", "[4/5] reward model", "[5/5] PPO"):
        assert any(line.startswith(step) for line in lines), step
    assert [line.split("|")[0].split()[-1] for line in lines if line.startswith("step ")] == \
        ["20/40", "40/40", "5/10", "10/10"]  # SFT logs every 20 steps, the reward model every 5
    assert len([line for line in lines if line.startswith("iteration ")]) == 3
    noise = [line for line in lines if NOISE.search(line)]
    assert not noise, noise
    assert run.stderr == "", run.stderr  # nothing on the console's stderr unless something fails

    # Everything else is in the log files the console names.
    logs = out / "logs"
    assert f"logs in {logs}/" in console
    driver = (logs / "llmp.log").read_text()
    assert "vllm" in driver and "WARNING" in driver  # the in-process engines' vLLM warnings
    workers = "".join(p.read_text(errors="replace") for p in (logs / "ray").glob("worker-*"))
    assert "Reporting training result" in workers  # Ray Train's per-report line, off the console
    assert "LD_PRELOAD" in workers or "Triton" in workers  # the rollout actor's vLLM engine spoke in its log
    assert "tiny-s-chat" in (logs / "server.log").read_text()  # the server's own log, copied beside the others
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rlhf"]["ppo"]["iterations"] == 3 and len(summary["rlhf"]["answers"]) == 2
