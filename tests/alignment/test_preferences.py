"""Preference pairs as tokens (the same as TRL's trainers make them), and the reward/DPO configs; no Ray."""

from __future__ import annotations

import pytest

from llm_platform.config import load_config
from llm_platform.errors import ConfigError, PlatformError
from tests.alignment.conftest import CONFIGS


@pytest.fixture(scope="module")
def pairs():
    from llm_platform.alignment.preferences import PreferenceData, load_pairs

    return load_pairs(PreferenceData(eval_limit=6), "test")


def test_reward_scorer_tokens_match_the_reward_trainers(tiny_models, pairs, tmp_path):
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from llm_platform.alignment.preferences import as_conversations
    from llm_platform.alignment.reward import RewardScorer
    from llm_platform.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_models["tiny-s"]))
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["tiny-s"], num_labels=1)
    trainer = RewardTrainer(model=model, args=RewardConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
                            train_dataset=as_conversations(pairs), processing_class=tokenizer)
    scorer = RewardScorer.from_model(model, tokenizer)
    for record, trained in zip(pairs, trainer.train_dataset):
        assert scorer.token_ids(record["prompt"], record["chosen"]) == trained["chosen_ids"]
        assert scorer.token_ids(record["prompt"], record["rejected"]) == trained["rejected_ids"]
    assert tokenizer.decode(trained["chosen_ids"]).endswith(record["chosen"] + tokenizer.eos_token + "\n")


def test_reply_tokens_match_the_dpo_trainers(tiny_models, pairs, tmp_path):
    from trl import DPOConfig, DPOTrainer

    from llm_platform.alignment.preferences import as_conversations, reply_tokens
    from llm_platform.models.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_models["tiny-s"]))
    trainer = DPOTrainer(model=load_causal_lm(str(tiny_models["tiny-s"])),
                         args=DPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
                         train_dataset=as_conversations(pairs), processing_class=tokenizer)
    for record, trained in zip(pairs, trainer.train_dataset):
        assert reply_tokens(tokenizer, record["prompt"], record["chosen"]) == (trained["prompt_ids"],
                                                                                trained["chosen_ids"])
        assert reply_tokens(tokenizer, record["prompt"], record["rejected"])[1] == trained["rejected_ids"]


def test_conversational_records_pass_through(pairs):
    from llm_platform.alignment.preferences import as_conversations

    once = as_conversations(pairs)
    assert once[0]["prompt"] == [{"role": "user", "content": pairs[0]["prompt"]}]
    assert once[0]["rejected"] == [{"role": "assistant", "content": pairs[0]["rejected"]}]
    assert as_conversations(once).to_list() == once.to_list()


def test_reward_and_dpo_configs_validate():
    from llm_platform.alignment import dpo_job as dpo
    from llm_platform.alignment import reward_job as reward_model

    for name in ("local_reward.yaml", "gpu_reward.yaml"):
        cfg = load_config(reward_model.RewardJobConfig, CONFIGS / name)
        assert cfg.scaling.use_gpu == name.startswith("gpu_")
    for name in ("local_dpo.yaml", "gpu_dpo.yaml"):
        cfg = load_config(dpo.DPOJobConfig, CONFIGS / name)
        assert cfg.scaling.use_gpu == name.startswith("gpu_")
        if cfg.scaling.use_gpu:
            assert cfg.dtype == "bfloat16" and "://" in cfg.output_dir and cfg.data.source.count("/") == 1
    assert load_config(reward_model.RewardJobConfig, CONFIGS / "local_reward.yaml").model == "artifacts/models/tiny-s"
    with pytest.raises(ConfigError, match="did you mean 'beta'"):
        load_config(dpo.DPOJobConfig, CONFIGS / "local_dpo.yaml", ["betta=0.2"])
    with pytest.raises(ConfigError, match="multiple of scaling.num_workers"):
        load_config(reward_model.RewardJobConfig, CONFIGS / "local_reward.yaml",
                    ["optim.batch_size=15", "scaling.num_workers=2"])
    with pytest.raises(ConfigError, match="sharding"):
        load_config(dpo.DPOJobConfig, CONFIGS / "local_dpo.yaml", ["scaling.sharding=fsdp"])
    with pytest.raises(ConfigError, match="data.max_length"):
        load_config(reward_model.RewardJobConfig, CONFIGS / "local_reward.yaml", ["data.max_length=4"])


def test_bad_inputs_fail_before_any_worker_starts(tiny_models, tmp_path):
    from llm_platform.alignment import reward_job as reward_model

    def run(*overrides):
        return reward_model.main(load_config(reward_model.RewardJobConfig, CONFIGS / "local_reward.yaml",
                                             [f"output_dir={tmp_path}", *overrides]))

    with pytest.raises(PlatformError, match="does not exist"):
        run(f"model={tmp_path / 'no-model'}")
    with pytest.raises(PlatformError, match="lacks column"):
        run(f"model={tiny_models['tiny-s']}", "data.source=synthetic:sentiment")
