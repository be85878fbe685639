"""Reward model (Bradley-Terry, TRL RewardTrainer on Ray Train) and DPO (TRL DPOTrainer) on the tiny models."""

from __future__ import annotations

import json

import pytest
import torch

from llm_platform.config import load_config
from llm_platform.errors import ConfigError
from tests.alignment.conftest import CONFIGS


@pytest.mark.slow
def test_reward_model_ranks_held_out_pairs_and_is_centred(reward_run):
    from llm_platform.alignment.preferences import load_pairs
    from llm_platform.alignment.reward import RewardScorer

    out, summary = reward_run
    assert summary["eval_accuracy"] >= 0.9
    scorer = RewardScorer(str(out / "model"))
    train = load_pairs("synthetic:preferences", "train")
    rewards = scorer.score(list(train["prompt"]) * 2, list(train["chosen"]) + list(train["rejected"]))
    assert abs(sum(rewards) / len(rewards)) < 0.05
    test = load_pairs("synthetic:preferences", "test", limit=50)
    chosen = scorer.score(list(test["prompt"]), list(test["chosen"]))
    rejected = scorer.score(list(test["prompt"]), list(test["rejected"]))
    assert sum(c > r for c, r in zip(chosen, rejected)) >= 45
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] / 2


@pytest.mark.slow
def test_dpo_raises_the_chosen_over_rejected_margin(ray_local, sft_chat_model, tmp_path):
    from peft import PeftModel

    from llm_platform.alignment.preferences import load_pairs, preference_margins
    from llm_platform.models.loading import load_causal_lm, load_tokenizer
    from train_jobs import dpo

    summary = dpo.main(load_config(dpo.DPOJobConfig, CONFIGS / "local_dpo.yaml",
                                   [f"model={sft_chat_model}", f"output_dir={tmp_path}", "optim.save_every=100"]))
    assert summary["margin_after"] > summary["margin_before"] + 1.0
    assert summary["eval_accuracy"] >= 0.8
    tokenizer = load_tokenizer(str(sft_chat_model))
    test = load_pairs("synthetic:preferences", "test", limit=40)
    base = preference_margins(load_causal_lm(str(sft_chat_model)), tokenizer, test)
    tuned = preference_margins(PeftModel.from_pretrained(load_causal_lm(str(sft_chat_model)), tmp_path / "adapter"),
                               tokenizer, test)
    assert float(tuned.mean()) > float(base.mean()) + 1.0
    assert not torch.allclose(tuned, base)


def test_preference_configs_validate():
    from train_jobs import dpo, reward_model

    for name in ("local_reward.yaml", "gpu_reward.yaml"):
        load_config(reward_model.RewardJobConfig, CONFIGS / name)
    for name in ("local_dpo.yaml", "gpu_dpo.yaml"):
        load_config(dpo.DPOJobConfig, CONFIGS / name)
    with pytest.raises(ConfigError, match="did you mean 'beta'"):
        load_config(dpo.DPOJobConfig, CONFIGS / "local_dpo.yaml", ["betta=0.2"])
