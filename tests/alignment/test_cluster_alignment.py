"""The RLHF chain on the two-node cluster (tests/ray_cluster.py), chained through S3 as users chain it on a
cluster: the SFT model is read from ``s3://``, the reward job publishes its model to S3, PPO reads both by URI
and publishes its outputs there; DPO starts from the same SFT model, beside the reward job. The drivers run where
the test does (the head's view of the disks); the training workers, the reward actor and the vLLM rollout actor
run on the worker node, whose disk the drivers cannot see. The cluster's nodes have no S3 variables: the drivers
reach them through the jobs' runtime environment.

PPO runs its whole local config here: the reward rises, KL stays bounded, the rollout actor's log-probabilities
match the trainer's every iteration, and SIGKILLing the rollout actor mid-run costs a replacement on the worker
node, not the run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from llm_platform.storage import open_filesystem
from tests.training.conftest import REPO

pytestmark = pytest.mark.slow

JOB_ACTORS = ("RolloutWorker", "RewardWorker", "RayTrainWorker")


def actors_started(temp: Path) -> Counter:
    """The job actors each node started, counted from its Ray session logs: every actor's process writes
    ``:actor_name:CLASS`` into its ``worker-*.out`` when the actor starts. The logs stay when the actors and
    the jobs are gone (the GCS forgets a finished job's dead actors, so a listing after the job can miss them)."""
    counts = Counter()
    for log in temp.glob("session_*/logs/worker-*.out"):
        counts.update(name for name in re.findall(r":actor_name:(\w+)", log.read_text(errors="replace"))
                      if name in JOB_ACTORS)
    return counts


def start_driver(ray_cluster, s3, module: str, *overrides: str) -> subprocess.Popen:
    # Output into files, not pipes: nothing reads a pipe while the test watches the run, and a full one would
    # stall the driver.
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    run = subprocess.Popen([sys.executable, "-m", module, *overrides], cwd=REPO, env={**ray_cluster.env, **s3.env},
                           stdout=out, stderr=err)
    run.outputs = (out, err)
    return run


def finish(run: subprocess.Popen, timeout: float = 900) -> None:
    run.wait(timeout=timeout)
    stdout, stderr = (f.seek(0) or f.read().decode(errors="replace") for f in run.outputs)
    assert run.returncode == 0, stdout[-2000:] + stderr[-3000:]


def driver(ray_cluster, s3, module: str, *overrides: str) -> None:
    finish(start_driver(ray_cluster, s3, module, *overrides))


def kill_rollout_actor_at_first_checkpoint(ray_cluster, s3, ppo_out: str, run: subprocess.Popen) -> int:
    """SIGKILL (as the OOM killer would) the rollout actor once the run's first checkpoint (iteration 2 of 12) is
    in S3; the nodes share this machine's process table. Returns the killed PID."""
    deadline, pid = time.time() + 600, None
    while time.time() < deadline and run.poll() is None:
        if pid is None:  # looked up once it is up: listing actors through the cluster takes seconds
            actors = ray_cluster.actors("RolloutWorker")
            pid = actors[0]["pid"] if actors else None
            assert len(actors) <= 1, actors
        if pid is not None and any("checkpoint_" in p for p in s3.listing(f"{ppo_out}/ray")):
            os.kill(pid, signal.SIGKILL)
            return pid
        time.sleep(0.2)
    if run.poll() is None:
        run.kill()
    finish(run, timeout=30)  # shows the driver's output when it failed
    raise AssertionError("PPO ended (or timed out) before its first checkpoint reached S3")


def actors_ran_off_the_head(ray_cluster, before: Counter) -> tuple[set[str], Counter]:
    """The job actor classes the worker node started since ``before``; none ever started on the head."""
    assert not actors_started(ray_cluster.head_temp), actors_started(ray_cluster.head_temp)
    now = actors_started(ray_cluster.worker_temp)
    return {name for name in JOB_ACTORS if now[name] > before[name]}, now


def test_reward_model_then_ppo_and_dpo_on_the_worker_node_chained_through_s3(sft_chat_model, ray_cluster, s3):
    started = actors_started(ray_cluster.worker_temp)
    sft = s3.uri("sft-chat-model")
    fs, path = open_filesystem(sft)
    pafs.copy_files(str(sft_chat_model.result()), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)

    # The reward model and DPO both start from the SFT model: their jobs run side by side (a CPU of the worker
    # node each), then PPO with the reward model.
    reward_out, dpo_out = s3.uri("cluster-reward"), s3.uri("cluster-dpo")
    dpo = start_driver(ray_cluster, s3, "train_jobs.dpo", "--config", "train_jobs/configs/local_dpo.yaml",
                       f"model={sft}", f"output_dir={dpo_out}", "optim.max_steps=6", "optim.save_every=3",
                       "data.eval_limit=32")
    try:  # the reward job's whole local config: PPO needs a reward model that ranks replies
        driver(ray_cluster, s3, "train_jobs.reward_model", "--config", "train_jobs/configs/local_reward.yaml",
               f"model={sft}", f"output_dir={reward_out}", "optim.save_every=0")
    finally:
        finish(dpo)
    reward_summary = json.loads(s3.read(f"{reward_out}/summary.json"))
    assert reward_summary["output"] == f"{reward_out}/model" and reward_summary["eval_accuracy"] >= 0.9
    assert {"config.yaml", "metrics.jsonl", "model/config.json",
            "model/model.safetensors"} <= set(s3.listing(reward_out))
    dpo_summary = json.loads(s3.read(f"{dpo_out}/summary.json"))
    assert dpo_summary["output"] == f"{dpo_out}/adapter"
    listed = set(s3.listing(dpo_out))
    assert {"config.yaml", "metrics.jsonl", "adapter/adapter_model.safetensors"} <= listed
    assert any(p.startswith("ray/") and "checkpoint_" in p for p in listed)
    ran, started = actors_ran_off_the_head(ray_cluster, started)
    assert ran == {"RayTrainWorker"}

    ppo_out = s3.uri("cluster-ppo")
    run = start_driver(ray_cluster, s3, "train_jobs.rlhf", "--config", "train_jobs/configs/local_rlhf.yaml",
                       f"policy_model={sft}", f"reward_model={reward_summary['output']}", f"output_dir={ppo_out}")
    killed = kill_rollout_actor_at_first_checkpoint(ray_cluster, s3, ppo_out, run)
    assert killed not in [a["pid"] for a in ray_cluster.actors("RolloutWorker")]
    finish(run)
    summary = json.loads(s3.read(f"{ppo_out}/summary.json"))
    rows = [json.loads(line) for line in s3.read(f"{ppo_out}/metrics.jsonl").decode().splitlines()]
    rows = [r for r in rows if "reward_mean" in r]
    print(json.dumps(summary, indent=2))
    assert [r["iteration"] for r in rows] == list(range(1, 13))
    assert summary["reward_last_quarter"] > summary["reward_first_quarter"] + 0.5
    # Every iteration the rollout actor (on the worker node) generated with the adapter version the trainer
    # had just published to it: its log-probabilities equal the trainer's, the replacement's too.
    assert all(r["rollout_engine"] == "vllm" for r in rows) and max(r["logprob_abs_diff"] for r in rows) < 1e-2
    assert max(r["kl"] for r in rows) < 2.5 * 4.0  # the adaptive penalty holds KL near its target (kl_target 4)
    assert summary["rollout_workers_replaced"] == 1 and rows[-1]["rollout_workers_replaced"] == 1
    for key in ("iteration", "reward_mean", "reward_std", "kl", "kl_coef", "entropy", "policy_loss", "value_loss",
                "clip_fraction", "response_length", "rollout_engine", "rollout_tokens_per_s", "logprob_abs_diff",
                "generate_s", "score_s", "learn_s", "sync_s"):
        assert key in rows[-1], key
    listed = set(s3.listing(ppo_out))
    assert {"config.yaml", "summary.json", "adapter/adapter_model.safetensors"} <= listed
    assert any(p.startswith("ray/") and "checkpoint_" in p for p in listed)  # PPO's checkpoints in the store
    # The reward actor asks for no resources: it must still not land on the head (it is pinned to rank 0's node).
    ran, _ = actors_ran_off_the_head(ray_cluster, started)
    assert ran == {"RolloutWorker", "RewardWorker", "RayTrainWorker"}
