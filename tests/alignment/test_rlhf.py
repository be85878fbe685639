"""The RLHF loop end to end on the tiny models: SFT policy, trained reward model, PPO on a vLLM rollout
actor. Reward rises, KL stays bounded, the engine's log-probabilities match the trainer's every
iteration, and killing the rollout actor mid-run costs a replacement, not the run."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from llm_platform.config import load_config
from llm_platform.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "train_jobs" / "configs"


def test_rlhf_configs_validate():
    from llm_platform.alignment.config import RLHFConfig

    assert load_config(RLHFConfig, CONFIGS / "local_rlhf.yaml").rollout.engine == "vllm"
    gpu = load_config(RLHFConfig, CONFIGS / "gpu_rlhf.yaml")
    assert gpu.scaling.use_gpu and gpu.dtype == "bfloat16" and gpu.reward_actor.num_gpus == 1
    assert gpu.logprob_tolerance == 0.1 and load_config(RLHFConfig, CONFIGS / "local_rlhf.yaml").logprob_tolerance == 1e-2
    with pytest.raises(ConfigError, match="dtype: float32 on GPUs is refused"):
        load_config(RLHFConfig, CONFIGS / "gpu_rlhf.yaml", ["dtype=float32"])
    with pytest.raises(ConfigError, match="lora.dropout"):
        load_config(RLHFConfig, CONFIGS / "local_rlhf.yaml", ["lora.dropout=0.1"])
    with pytest.raises(ConfigError, match="did you mean 'iterations'"):
        load_config(RLHFConfig, CONFIGS / "local_rlhf.yaml", ["ppo.iteration=3"])


def kill_rollout_actor_after(name: str, metrics: Path, iteration: int, done: threading.Event, killed: list) -> None:
    """Kill the rollout actor's process (SIGKILL, as the OOM killer would) once ``iteration`` is logged."""
    import ray

    while not done.is_set():
        rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        if rows and rows[-1].get("iteration", 0) >= iteration:
            pid = ray.get(ray.get_actor(name).pid.remote())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return
        time.sleep(0.5)


@pytest.mark.slow
def test_ppo_raises_reward_and_survives_a_killed_rollout_actor(ray_local, rlhf_inputs, tmp_path):
    from llm_platform.alignment.config import RLHFConfig
    from llm_platform.alignment import rlhf_job as rlhf

    sft_model, reward_model = rlhf_inputs
    cfg = load_config(RLHFConfig, CONFIGS / "local_rlhf.yaml",
                      [f"policy_model={sft_model}", f"reward_model={reward_model}", f"output_dir={tmp_path}"])
    done, killed = threading.Event(), []
    killer = threading.Thread(target=kill_rollout_actor_after, args=(f"{cfg.run_name}-rollout-0", tmp_path / "metrics.jsonl", 3, done, killed))
    killer.start()
    try:
        summary = rlhf.main(cfg)
    finally:
        done.set()
        killer.join()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "reward_mean" in r]
    print(json.dumps(summary, indent=2))
    assert len(rows) == cfg.ppo.iterations >= 8
    assert summary["reward_last_quarter"] > summary["reward_first_quarter"] + 0.5
    assert all(r["rollout_engine"] == "vllm" for r in rows)
    assert max(r["logprob_abs_diff"] for r in rows) < 1e-2
    assert max(r["kl"] for r in rows) < 2.5 * cfg.ppo.kl_target  # the adaptive penalty holds KL near its target
    assert killed and summary["rollout_workers_replaced"] == 1
    for key in ("iteration", "reward_mean", "reward_std", "kl", "kl_coef", "entropy", "policy_loss", "value_loss",
                "clip_fraction", "response_length", "rollout_engine", "rollout_tokens_per_s", "logprob_abs_diff",
                "generate_s", "score_s", "learn_s", "sync_s"):
        assert key in rows[-1], key
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
