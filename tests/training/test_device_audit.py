"""Device audit: each job's worker-side model construction (SFT LoRA and full, the reward model and PPO's
reward scorer, PPO's policy with its value head and reference), every parameter and buffer checked against
the device and dtype the config's placement decides. Here the device is the CPU, in float32 and in the GPU
configs' bfloat16; for the GPU configs themselves the decision (cuda, bf16, float32 master weights under
FSDP) is checked as a pure function, since no GPU is lent to this project."""

from __future__ import annotations

import pytest
import torch

from llm_platform.config import load_config
from llm_platform.errors import PlatformError
from llm_platform.training.devices import audit, placement, sft_placement
from tests.training.conftest import CONFIGS


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_sft_models_are_where_the_config_says(method, dtype, tiny_models):
    from llm_platform.training.config import SFTConfig
    from llm_platform.training.methods import build_model

    cfg = SFTConfig(model=str(tiny_models["tiny-s"]), method=method, dtype=dtype)
    where = sft_placement(cfg)
    model = build_model(cfg, str(where.check(torch.device("cpu"))))
    assert audit(model, where) == []
    if method == "lora" and dtype == "bfloat16":  # adapters float32 on a bf16 base
        dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
        assert dtypes == {torch.float32} and where.dtype == torch.bfloat16


def test_reward_model_and_scorer_and_ppo_policy_are_where_the_config_says(tiny_models, tmp_path):
    from llm_platform.alignment.config import RewardJobConfig, RLHFConfig
    from llm_platform.alignment.reward import RewardScorer
    from llm_platform.alignment.reward_job import build_reward_model
    from llm_platform.alignment.rlhf_job import build_policy, policy_placement

    reward_cfg = RewardJobConfig(model=str(tiny_models["tiny-s"]), dtype="bfloat16")
    where = placement(reward_cfg.scaling.use_gpu, reward_cfg.dtype)
    model, tokenizer = build_reward_model(reward_cfg, str(where.check("cpu")))
    assert audit(model, where) == [] and model.score.weight.dtype == torch.bfloat16
    model.save_pretrained(tmp_path / "reward")
    tokenizer.save_pretrained(tmp_path / "reward")

    cfg = RLHFConfig(policy_model=str(tiny_models["tiny-s"]), reward_model=str(tmp_path / "reward"),
                     dtype="bfloat16")
    scorer_where = placement(cfg.reward_actor.num_gpus > 0, cfg.reward_dtype)  # what run_ppo gives the actor
    scorer = RewardScorer(cfg.reward_model, scorer_where.device_type, dtype=cfg.reward_dtype)
    assert audit(scorer.model, scorer_where) == []

    where = policy_placement(cfg)
    policy, _ = build_policy(cfg, str(where.check("cpu")))
    assert audit(policy, where) == []
    assert policy.value_head.weight.dtype == torch.float32 and where.dtype == torch.bfloat16
    ids = torch.tensor([[1, 5, 9, 11]])
    with torch.no_grad():  # the reference is the same modules with the adapter off: it runs where they are
        assert policy.reference_logits(ids, torch.ones_like(ids)).shape == (1, 4, policy.policy.config.vocab_size)


def test_the_audit_names_what_is_left_elsewhere(tiny_models):
    from llm_platform.alignment.config import RLHFConfig
    from llm_platform.alignment.rlhf_job import build_policy, policy_placement

    cfg = RLHFConfig(policy_model=str(tiny_models["tiny-s"]), reward_model="unused", dtype="bfloat16")
    policy, _ = build_policy(cfg)
    policy.value_head.to(torch.bfloat16)  # a value head in the policy's dtype: rounded updates
    assert audit(policy, policy_placement(cfg)) == [
        "value_head.weight: cpu torch.bfloat16 (expected cpu torch.float32)",
        "value_head.bias: cpu torch.bfloat16 (expected cpu torch.float32)"]
    # On a GPU worker every tensor of a model left on the CPU is named.
    on_gpu = placement(True, "bfloat16", trains="adapter")
    left = audit(policy, on_gpu)
    assert len(left) == len(list(policy.parameters())) + len(list(policy.buffers()))
    assert all("(expected cuda" in line for line in left)
    with pytest.raises(PlatformError, match="worker's device is cpu, but the config asks for cuda"):
        on_gpu.check(torch.device("cpu"))


def test_gpu_configs_place_models_on_cuda_in_bf16():
    from llm_platform.alignment.config import DPOJobConfig, RewardJobConfig, RLHFConfig
    from llm_platform.alignment.rlhf_job import policy_placement, rollout_device
    from llm_platform.training.config import SFTConfig

    full = sft_placement(load_config(SFTConfig, CONFIGS / "gpu_full_fsdp.yaml"))
    assert (full.device_type, full.dtype, full.trained_dtype) == ("cuda", torch.float32, torch.float32)  # FSDP master
    qlora = sft_placement(load_config(SFTConfig, CONFIGS / "gpu_qlora.yaml"))
    assert qlora.device_type == "cuda" and qlora.trained_dtype == torch.float32
    assert full.check("cuda:3") == torch.device("cuda:3")
    for cls, name in ((RewardJobConfig, "gpu_reward.yaml"), (DPOJobConfig, "gpu_dpo.yaml")):
        cfg = load_config(cls, CONFIGS / name)
        assert placement(cfg.scaling.use_gpu, cfg.dtype) == placement(True, "bfloat16")
        assert placement(True, "bfloat16").dtype == torch.bfloat16
    rlhf = load_config(RLHFConfig, CONFIGS / "gpu_rlhf.yaml")
    policy = policy_placement(rlhf)
    assert (policy.device_type, policy.dtype, policy.trained_dtype) == ("cuda", torch.bfloat16, torch.float32)
    scorer = placement(rlhf.reward_actor.num_gpus > 0, rlhf.reward_dtype)
    assert (scorer.device_type, scorer.dtype) == ("cuda", torch.bfloat16)
    assert rollout_device(rlhf.model_copy(update={"rollout": rlhf.rollout.model_copy(
        update={"engine": "transformers"})})) == "cuda"  # a transformers rollout engine in a GPU actor
    assert rollout_device(load_config(RLHFConfig, CONFIGS / "local_rlhf.yaml")) == "cpu"
    # The local configs stay on the CPU in float32.
    local = sft_placement(load_config(SFTConfig, CONFIGS / "local_full.yaml"))
    assert (local.device_type, local.dtype) == ("cpu", torch.float32)
