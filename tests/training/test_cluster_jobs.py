"""Training jobs on the two-node cluster (tests/ray_cluster.py): the driver runs where the test does
(the head's view of the disks), the Ray Train worker on the worker node, whose temp folder and output
root are private to it. Its nodes have no S3 variables: the driver's reach the worker through the
job's runtime_env."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.training.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.environ.get("LLMP_CLUSTER_TESTS") != "1",
                                                   reason="two-node cluster tests are opt-in (LLMP_CLUSTER_TESTS=1)")]
SFT = [sys.executable, "-m", "train_jobs.sft", "--config", "train_jobs/configs/local_lora.yaml", "optim.max_steps=20",
       "optim.save_every=10", "optim.log_every=5", "data.eval_limit=32", "scaling.cpus_per_worker=1"]


def test_sft_on_the_worker_node_publishes_everything_to_s3(ray_cluster, s3, tiny_models):
    out = s3.uri("cluster-sft")
    run = subprocess.run([*SFT, f"model={tiny_models['tiny-s']}", f"output_dir={out}"], cwd=REPO,
                         env={**ray_cluster.env, **s3.env}, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    summary = json.loads(s3.read(f"{out}/summary.json"))
    assert summary["output"] == f"{out}/adapter" and summary["steps"] == 20
    listed = s3.listing(out)
    assert {"config.yaml", "metrics.jsonl", "summary.json", "adapter/adapter_model.safetensors"} <= set(listed)
    assert any(p.startswith("ray/sft-lora/checkpoint_") for p in listed)  # Ray Train's storage: OUTPUT_DIR/ray
    # The worker staged its outputs in its private temp folder and removed them once uploaded.
    assert not list(ray_cluster.worker_private.glob("llmp-staging/*"))


def test_a_local_output_dir_the_worker_node_cannot_see_fails_at_once_with_what_to_use(ray_cluster, tiny_models):
    out = ray_cluster.outputs / "sft-local"  # private to the worker node: the head's copy stays empty
    run = subprocess.run([*SFT, f"model={tiny_models['tiny-s']}", f"output_dir={out}", "scaling.max_failures=0"],
                         cwd=REPO, env=ray_cluster.env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-3000:]
    assert "does not see" in run.stderr and "s3:// or gs:// URI" in run.stderr
