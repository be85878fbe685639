"""``ray job submit`` against a real Ray head started for the test, with ``output_dir`` (and so Ray Train's
storage) on a real S3 server, and a worker killed mid-run: Ray Train restarts the group, the run resumes
from its last checkpoint, downloaded from S3, and still finishes; every output ends in S3."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from llm_platform.cluster import free_port
from tests.training.conftest import REPO

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_head(s3, tmp_path_factory):
    """A Ray head on free ports with its own temp dir and its own auth token (none left from other runs).
    Its environment has the S3 server's endpoint and keys (the ``s3`` fixture puts them in ours)."""
    temp = tmp_path_factory.mktemp("ray")
    gcs, dashboard = free_port(), free_port()
    address = f"http://127.0.0.1:{dashboard}"
    # RAY_API_SERVER_ADDRESS: the head's processes ask their own state API, not the machine's latest
    # cluster (see llm_platform/cluster.py).
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_API_SERVER_ADDRESS": address}
    env.pop("RAY_ADDRESS", None)
    # --block keeps `ray start` in the foreground: stopping it stops this head only (`ray stop` would
    # stop every Ray process on the machine, other tests' clusters included).
    # Every port explicit: other tests' Ray clusters may hold the defaults (the agent's 52365).
    ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
    head = subprocess.Popen([BIN / "ray", "start", "--head", "--block", f"--port={gcs}",
                             f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--num-cpus=2",
                             f"--temp-dir={temp}", "--disable-usage-stats", *ports],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while subprocess.run([BIN / "ray", "job", "list", "--address", address], env=env,
                         capture_output=True).returncode != 0:
        assert head.poll() is None and time.time() < deadline, "the Ray head did not come up"
        time.sleep(1)
    yield {"env": env, "address": address}
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(10)
    except subprocess.TimeoutExpired:  # a graceful stop takes ~30 s; the head and its temp dir are ours alone
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(30)


def job_status(head, job_id: str) -> str:
    out = subprocess.run([BIN / "ray", "job", "status", "--address", head["address"], job_id], env=head["env"],
                         capture_output=True, text=True, timeout=60)
    text = (out.stdout + out.stderr).upper()  # the CLI logs the status to stderr
    return next((s for s in ("SUCCEEDED", "FAILED", "STOPPED", "RUNNING", "PENDING") if s in text), "UNKNOWN")


def job_logs(head, job_id: str) -> str:
    return subprocess.run([BIN / "ray", "job", "logs", "--address", head["address"], job_id], env=head["env"],
                          capture_output=True, text=True, timeout=60).stdout


def train_worker_pids(head) -> list[int]:
    code = ("from ray.util.state import list_actors; import json; print(json.dumps([a.pid for a in list_actors("
            f"address='{head['address']}', filters=[('class_name', '=', 'RayTrainWorker'), ('state', '=', 'ALIVE')])]))")
    out = subprocess.run([sys.executable, "-c", code], env=head["env"], capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_submitted_job_survives_a_killed_worker(ray_head, s3, tiny_models, tmp_path):
    out = s3.uri("submitted-sft")
    staging = Path(tempfile.gettempdir()) / "llmp-staging"
    staged_before = set(staging.iterdir()) if staging.exists() else set()
    submit = [BIN / "ray", "job", "submit", "--address", ray_head["address"], "--working-dir", str(REPO),
              "--no-wait", "--", "python", "-m", "train_jobs.sft", "--config", "train_jobs/configs/local_lora.yaml",
              f"model={tiny_models['tiny-s']}", f"output_dir={out}", "optim.max_steps=60", "optim.save_every=10",
              "optim.log_every=5", "data.eval_limit=40"]
    result = subprocess.run(submit, cwd=REPO, env=ray_head["env"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", result.stdout + result.stderr).group(0)

    deadline = time.time() + 300
    while time.time() < deadline:  # kill once two checkpoints (steps 10, 20) are in S3, before the end
        if len({p.split("/")[0] for p in s3.listing(f"{out}/ray/sft-lora") if p.startswith("checkpoint_")}) >= 2:
            break
        assert job_status(ray_head, job_id) in ("PENDING", "RUNNING"), job_logs(ray_head, job_id)[-3000:]
        time.sleep(0.5)
    pids = train_worker_pids(ray_head)
    assert len(pids) == 1
    os.kill(pids[0], signal.SIGKILL)

    while job_status(ray_head, job_id) in ("PENDING", "RUNNING") and time.time() < deadline + 300:
        time.sleep(2)
    logs = job_logs(ray_head, job_id)
    assert job_status(ray_head, job_id) == "SUCCEEDED", logs[-3000:]
    summary = json.loads(s3.read(f"{out}/summary.json"))
    rows = [json.loads(line) for line in s3.read(f"{out}/metrics.jsonl").decode().splitlines()]
    resumed = [r for r in rows if r.get("event") == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] >= 10 and summary["resumed_from_step"] == resumed[0]["step"]
    assert [r["step"] for r in rows if "loss" in r][-1] == 60
    assert summary["output"] == f"{out}/adapter"
    assert {"config.yaml", "metrics.jsonl", "summary.json", "adapter/adapter_config.json",
            "adapter/adapter_model.safetensors"} <= set(s3.listing(out))
    assert not [p for p in s3.listing(out) if p.startswith(".llmp-run-")]  # the driver's marker is gone
    assert (set(staging.iterdir()) if staging.exists() else set()) == staged_before  # staging folder removed
    assert "resumed from the checkpoint" in logs
