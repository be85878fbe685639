"""The reward-model job on its local config (tiny-s, Ray Train in this process): it learns to rank held-out
pairs, its saved rewards average 0 over the training set, and a changed rerun is refused."""

from __future__ import annotations

import json
from functools import partial

import pytest

from llm_platform.config import load_config
from llm_platform.errors import PlatformError
from tests.alignment.conftest import CONFIGS


def reward_config(model, out, *overrides):
    from llm_platform.alignment.config import RewardJobConfig

    return load_config(RewardJobConfig, CONFIGS / "local_reward.yaml", [f"model={model}", f"output_dir={out}",
                                                                        *overrides])


@pytest.fixture(scope="module")
def reward_runs(ray_local, tiny_models, tmp_path_factory):
    """The local config's run and a LoRA one, each on one single-threaded worker: two at a time
    (tests/training/conftest.two_at_a_time). ``reward_runs[name]`` is ``(output folder, future of the summary)``."""
    from llm_platform.alignment import reward_job as reward_model
    from tests.training.conftest import two_at_a_time

    outs = {"local": tmp_path_factory.mktemp("reward-local"), "lora": tmp_path_factory.mktemp("reward-lora")}
    overrides = {"local": [], "lora": ["run_name=reward-lora", "lora={r: 8, alpha: 16}", "optim.learning_rate=3e-3",
                                      "optim.max_steps=15"]}
    jobs = {name: partial(reward_model.main, reward_config(tiny_models["tiny-s"], out, *overrides[name]))
            for name, out in outs.items()}
    with two_at_a_time(jobs) as futures:
        yield {name: (outs[name], future) for name, future in futures.items()}


@pytest.fixture(scope="module")
def local_reward_run(reward_runs):
    out, future = reward_runs["local"]
    return out, future.result()


@pytest.mark.slow
def test_reward_model_ranks_held_out_pairs(local_reward_run):
    out, summary = local_reward_run
    print({k: summary[k] for k in ("eval_accuracy_before", "eval_accuracy", "reward_margin", "train_seconds")})
    assert summary["eval_accuracy"] >= 0.9
    assert 0.25 <= summary["eval_accuracy_before"] <= 0.75  # a fresh score head on a random-init model: chance
    assert summary["reward_margin"] > 1.0 > abs(summary["reward_margin_before"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(5, summary["steps"] + 1, 5))
    assert rows[-1]["loss"] < rows[0]["loss"] / 10


@pytest.mark.slow
def test_saved_rewards_are_centred_on_the_training_set(local_reward_run):
    import torch
    from transformers import AutoModelForSequenceClassification

    from llm_platform.alignment.preferences import PreferenceData, load_pairs
    from llm_platform.alignment.reward import RewardScorer

    out, summary = local_reward_run
    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert model.config.num_labels == 1 and model.config.reward_offset == pytest.approx(summary["reward_offset"])
    scorer = RewardScorer(str(out / "model"))
    train = load_pairs(PreferenceData(), "train")
    rewards = scorer.score(list(train["prompt"]) * 2, list(train["chosen"]) + list(train["rejected"]))
    assert abs(sum(rewards) / len(rewards)) < 0.05
    assert summary["reward_offset"] != pytest.approx(0, abs=0.05)  # so the centring did something
    # The bare classifier gives the raw score: the scorer's reward plus the offset.
    ids = scorer.token_ids(train[0]["prompt"], train[0]["chosen"])
    with torch.no_grad():
        raw = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert raw - model.config.reward_offset == pytest.approx(rewards[0], abs=1e-4)
    polite, curt = scorer.score(["Any advice on tea?"] * 2, ["Happy to help! Steep the leaves for three minutes. "
                                                             "I hope this helps.", "Not my problem."])
    assert polite > 0 > curt


@pytest.mark.slow
def test_rerun_with_other_settings_is_refused(local_reward_run, tiny_models):
    from llm_platform.alignment import reward_job as reward_model

    out, _ = local_reward_run
    with pytest.raises(PlatformError, match=r"other settings \(changed: optim\)"):
        reward_model.main(reward_config(tiny_models["tiny-s"], out, "optim.learning_rate=1e-4"))


@pytest.mark.slow
def test_two_workers_train_like_one(local_reward_run, tiny_models, tmp_path):
    """DDP on two CPU workers: the global batch is split across them, so they log the same losses."""
    from llm_platform.alignment import reward_job as reward_model

    out, one = local_reward_run
    two = reward_model.main(reward_config(tiny_models["tiny-s"], tmp_path, "scaling.num_workers=2"))
    assert two["num_workers"] == 2 and two["eval_accuracy"] >= 0.9
    rows_one, rows_two = ([json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
                          for folder in (out, tmp_path))
    assert [r["loss"] for r in rows_two] == pytest.approx([r["loss"] for r in rows_one], rel=1e-2, abs=1e-5)
    assert [r["margin"] for r in rows_two] == pytest.approx([r["margin"] for r in rows_one], rel=1e-3)


@pytest.mark.slow
def test_lora_reward_model_is_merged_into_a_plain_classifier(reward_runs):
    from safetensors import safe_open

    from llm_platform.alignment.preferences import PreferenceData, load_pairs
    from llm_platform.alignment.reward import RewardScorer

    out, future = reward_runs["lora"]
    summary = future.result()
    assert summary["eval_accuracy"] >= 0.9
    with safe_open(out / "model" / "model.safetensors", "pt") as weights:
        assert "score.weight" in weights.keys() and not [k for k in weights.keys() if "lora" in k]
    reloaded = RewardScorer(str(out / "model")).pair_accuracy(load_pairs(PreferenceData(), "test"))
    assert reloaded == pytest.approx((summary["eval_accuracy"], summary["reward_margin"]), rel=1e-4)
