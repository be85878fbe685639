"""The RLHF job's configs. The loop itself runs end to end on the two-node cluster
(test_cluster_alignment.py): reward rises, KL stays bounded, the rollout actor's log-probabilities match
the trainer's every iteration, and a killed rollout actor is replaced without losing the run."""

from __future__ import annotations

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
