"""Training jobs on the two-node cluster (tests/ray_cluster.py): the Ray Train worker runs on the worker
node, whose temp folder and output root are private to it; the cluster's nodes have no S3 variables.

- ``ray job submit``, as users run it: the driver runs on the head, the S3 endpoint and keys come in the
  job's runtime environment, ``output_dir`` (and so Ray Train's storage) is on S3. The worker is
  SIGKILLed mid-run: Ray Train restarts the group, which resumes from the last checkpoint, downloaded
  from S3, and finishes; every output ends in S3, and the worker's staging folder is removed.
- Full fine-tuning sharded (FSDP) over two workers on the worker node publishes the whole model to S3.
- A local ``output_dir`` that the worker node cannot see fails at once, saying what to use instead."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.training.conftest import REPO

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
STEPS = 120
SFT = ["train_jobs.sft", "--config", "train_jobs/configs/local_lora.yaml", "optim.save_every=10", "optim.log_every=5",
       "data.eval_limit=32", "scaling.cpus_per_worker=1"]


def ray_cli(cluster, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([BIN / "ray", *args], env=cluster.env, capture_output=True, text=True, timeout=timeout)


def job_status(cluster, job_id: str) -> str:
    out = ray_cli(cluster, "job", "status", "--address", cluster.dashboard, job_id)
    text = (out.stdout + out.stderr).upper()  # the CLI logs the status to stderr
    return next((s for s in ("SUCCEEDED", "FAILED", "STOPPED", "RUNNING", "PENDING") if s in text), "UNKNOWN")


def job_logs(cluster, job_id: str) -> str:
    return ray_cli(cluster, "job", "logs", "--address", cluster.dashboard, job_id).stdout


def test_submitted_job_on_the_worker_node_survives_a_kill_and_publishes_everything_to_s3(ray_cluster, s3,
                                                                                           tiny_models):
    out = s3.uri("cluster-sft")
    staging = ray_cluster.worker_private / "llmp-staging"  # the worker node's tempfile.gettempdir()
    # The nodes have no S3 variables: the job's runtime environment brings them, as a user's would.
    runtime_env = json.dumps({"env_vars": s3.env})
    submit = ["job", "submit", "--address", ray_cluster.dashboard, "--working-dir", str(REPO), "--no-wait",
              "--runtime-env-json", runtime_env, "--", "python", "-m", *SFT, f"model={tiny_models['tiny-s']}",
              f"output_dir={out}", f"optim.max_steps={STEPS}"]
    result = subprocess.run([BIN / "ray", *submit], cwd=REPO, env=ray_cluster.env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", result.stdout + result.stderr).group(0)

    def wait_for_checkpoints(n: int) -> None:
        checked = time.time()
        while time.time() < deadline:
            if len({p.split("/")[0] for p in s3.listing(f"{out}/ray/sft-lora") if p.startswith("checkpoint_")}) >= n:
                return
            if time.time() - checked > 5:  # the CLI takes a second or two: asked now and then
                assert job_status(ray_cluster, job_id) in ("PENDING", "RUNNING"), job_logs(ray_cluster, job_id)[-3000:]
                checked = time.time()
            time.sleep(0.2)
        raise TimeoutError(f"fewer than {n} checkpoints in {out}/ray/sft-lora")

    # Everything slow (listing files and actors through the cluster) is done once the first checkpoint is in S3;
    # the worker is killed as soon as the second one (step 20 of STEPS) is: well before the end on any machine.
    deadline = time.time() + 400
    wait_for_checkpoints(1)
    # Mid-run the outputs are staged on the worker node only (metrics.jsonl so far), never on the head.
    staged = ray_cluster.worker_files(staging)
    assert any(f.endswith("metrics.jsonl") for f in staged), staged
    assert not staging.exists()
    workers = ray_cluster.actors("RayTrainWorker")
    assert len(workers) == 1
    wait_for_checkpoints(2)
    os.kill(workers[0]["pid"], signal.SIGKILL)  # the nodes share this machine's process table

    while job_status(ray_cluster, job_id) in ("PENDING", "RUNNING") and time.time() < deadline + 400:
        time.sleep(2)
    logs = job_logs(ray_cluster, job_id)
    assert job_status(ray_cluster, job_id) == "SUCCEEDED", logs[-3000:]
    assert "resumed from the checkpoint" in logs
    summary = json.loads(s3.read(f"{out}/summary.json"))
    rows = [json.loads(line) for line in s3.read(f"{out}/metrics.jsonl").decode().splitlines()]
    resumed = [r for r in rows if r.get("event") == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] >= 10 and summary["resumed_from_step"] == resumed[0]["step"]
    assert [r["step"] for r in rows if "loss" in r][-1] == STEPS
    assert [r["step"] for r in rows if "loss" in r][0] == 5  # rows from before the kill survived the restart
    assert summary["output"] == f"{out}/adapter"
    listed = s3.listing(out)
    assert {"config.yaml", "metrics.jsonl", "summary.json", "adapter/adapter_config.json",
            "adapter/adapter_model.safetensors"} <= set(listed)
    assert any(p.startswith("ray/sft-lora/checkpoint_") for p in listed)  # Ray Train's storage: OUTPUT_DIR/ray
    assert not [p for p in listed if p.startswith(".llmp-run-")]  # the driver's marker is gone
    assert ray_cluster.worker_files(staging) == []  # the worker's staging folder was uploaded, then removed


def test_full_fine_tuning_sharded_over_two_workers_publishes_the_model_to_s3(ray_cluster, s3, tiny_models):
    from safetensors import safe_open

    out = s3.uri("cluster-fsdp")
    run = subprocess.run([sys.executable, "-m", "train_jobs.sft", "--config", "train_jobs/configs/local_full.yaml",
                          f"model={tiny_models['tiny-s']}", f"output_dir={out}", "scaling.num_workers=2",
                          "scaling.cpus_per_worker=1", "optim.max_steps=6", "optim.save_every=3", "optim.log_every=2",
                          "data.eval_limit=16"],
                         cwd=REPO, env={**ray_cluster.env, **s3.env}, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    summary = json.loads(s3.read(f"{out}/summary.json"))
    assert summary["output"] == f"{out}/model" and summary["steps"] == 6
    # Each worker held half of the parameters while training ...
    assert len(summary["param_bytes_by_rank"]) == 2
    assert max(summary["param_bytes_by_rank"]) < 0.6 * summary["param_bytes_total"]
    listed = s3.listing(out)
    assert {"config.yaml", "metrics.jsonl", "model/config.json"} <= set(listed)
    # ... and the published model is whole: every tensor of the base, at full size, gathered from both shards.
    local = s3.download(f"{out}/model", Path(tempfile.mkdtemp()) / "model")
    saved = {}
    for file in local.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            saved |= {k: f.get_slice(k).get_shape() for k in f.keys()}
    with safe_open(str(tiny_models["tiny-s"] / "model.safetensors"), "pt") as f:
        base = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert {k: v for k, v in saved.items() if k in base} == base


def test_a_local_output_dir_the_worker_node_cannot_see_fails_at_once_with_what_to_use(ray_cluster, tiny_models):
    out = ray_cluster.outputs / "sft-local"  # private to the worker node: the head's copy stays empty
    run = subprocess.run([sys.executable, "-m", *SFT, f"model={tiny_models['tiny-s']}", f"output_dir={out}",
                          "optim.max_steps=20", "scaling.max_failures=0"],
                         cwd=REPO, env=ray_cluster.env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-3000:]
    assert "does not see" in run.stderr and "s3:// or gs:// URI" in run.stderr
