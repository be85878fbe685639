"""The reward model, PPO and DPO on the two-node cluster (tests/ray_cluster.py), chained through S3 as users
chain them on a cluster: the SFT model is read from ``s3://``, the reward job publishes its model to S3,
PPO reads both by URI and publishes its outputs there; DPO starts from the same SFT model. The drivers run where the test does (the head's
view of the disks); the training workers, the reward actor and the vLLM rollout actor run on the worker
node, whose disk the drivers cannot see. The cluster's nodes have no S3 variables: the drivers' reach
them through the jobs' runtime environment."""

from __future__ import annotations

import json
import re
import subprocess
import sys
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


def driver(ray_cluster, s3, module: str, *overrides: str) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-m", module, *overrides], cwd=REPO, env={**ray_cluster.env, **s3.env},
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return run


def actors_ran_off_the_head(ray_cluster, before: Counter) -> tuple[set[str], Counter]:
    """The job actor classes the worker node started since ``before``; none ever started on the head."""
    assert not actors_started(ray_cluster.head_temp), actors_started(ray_cluster.head_temp)
    now = actors_started(ray_cluster.worker_temp)
    return {name for name in JOB_ACTORS if now[name] > before[name]}, now


def test_reward_model_then_ppo_and_dpo_on_the_worker_node_chained_through_s3(ray_cluster, s3, sft_chat_model):
    started = actors_started(ray_cluster.worker_temp)
    sft = s3.uri("sft-chat-model")
    fs, path = open_filesystem(sft)
    pafs.copy_files(str(sft_chat_model), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)

    reward_out = s3.uri("cluster-reward")
    driver(ray_cluster, s3, "train_jobs.reward_model", "--config", "train_jobs/configs/local_reward.yaml",
           f"model={sft}", f"output_dir={reward_out}", "optim.max_steps=10", "optim.save_every=0",
           "data.eval_limit=32")
    reward_summary = json.loads(s3.read(f"{reward_out}/summary.json"))
    assert reward_summary["output"] == f"{reward_out}/model"
    assert {"config.yaml", "metrics.jsonl", "model/config.json", "model/model.safetensors"} <= set(s3.listing(reward_out))
    ran, started = actors_ran_off_the_head(ray_cluster, started)
    assert ran == {"RayTrainWorker"}

    ppo_out = s3.uri("cluster-ppo")
    driver(ray_cluster, s3, "train_jobs.rlhf", "--config", "train_jobs/configs/local_rlhf.yaml",
           f"policy_model={sft}", f"reward_model={reward_summary['output']}", f"output_dir={ppo_out}",
           "ppo.iterations=2", "ppo.prompts_per_iteration=8", "ppo.minibatch_size=8", "ppo.save_every=1")
    rows = [json.loads(line) for line in s3.read(f"{ppo_out}/metrics.jsonl").decode().splitlines()]
    rows = [r for r in rows if "reward_mean" in r]
    # Every iteration the rollout actor (on the worker node) generated with the adapter version the trainer
    # had just published to it: its log-probabilities equal the trainer's.
    assert [r["iteration"] for r in rows] == [1, 2] and all(r["rollout_engine"] == "vllm" for r in rows)
    assert max(r["logprob_abs_diff"] for r in rows) < 1e-2
    listed = set(s3.listing(ppo_out))
    assert {"config.yaml", "summary.json", "adapter/adapter_model.safetensors"} <= listed
    assert any(p.startswith("ray/") and "checkpoint_" in p for p in listed)  # PPO's checkpoints in the store
    # The reward actor asks for no resources: it must still not land on the head (it is pinned to rank 0's node).
    ran, started = actors_ran_off_the_head(ray_cluster, started)
    assert ran == {"RolloutWorker", "RewardWorker", "RayTrainWorker"}

    dpo_out = s3.uri("cluster-dpo")
    driver(ray_cluster, s3, "train_jobs.dpo", "--config", "train_jobs/configs/local_dpo.yaml", f"model={sft}",
           f"output_dir={dpo_out}", "optim.max_steps=6", "optim.save_every=3", "data.eval_limit=32")
    dpo_summary = json.loads(s3.read(f"{dpo_out}/summary.json"))
    assert dpo_summary["output"] == f"{dpo_out}/adapter"
    listed = set(s3.listing(dpo_out))
    assert {"config.yaml", "metrics.jsonl", "adapter/adapter_model.safetensors"} <= listed
    assert any(p.startswith("ray/") and "checkpoint_" in p for p in listed)
    ran, _ = actors_ran_off_the_head(ray_cluster, started)
    assert ran == {"RayTrainWorker"}
