"""``trust_remote_code``: a model folder that ships its own Python code (``auto_map`` in config.json, as many
hub models do) is refused with an error naming the setting unless the config turns it on; turned on, every
job's loader, the reward actor's scorer and the transformers engine build the model from that code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llm_platform.errors import ConfigError

CONFIGURATION = '''
from transformers import LlamaConfig


class CustomConfig(LlamaConfig):
    model_type = "llmp_custom"
'''
MODELING = '''
from torch import nn
from transformers import LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel, LlamaPreTrainedModel

from .configuration_custom import CustomConfig


class CustomModel(LlamaModel):
    config_class = CustomConfig


class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig


class CustomForSequenceClassification(LlamaForSequenceClassification):
    config_class = CustomConfig

    def __init__(self, config):  # its own backbone class (transformers' AutoModel knows no CustomConfig)
        LlamaPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = CustomModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()
'''


@pytest.fixture(scope="module")
def custom_model(tiny_models, tmp_path_factory) -> Path:
    """tiny-s with its architecture in the folder's own code: transformers knows no ``llmp_custom`` model."""
    folder = tmp_path_factory.mktemp("remote-code") / "custom"
    shutil.copytree(tiny_models["tiny-s"], folder)
    (folder / "configuration_custom.py").write_text(CONFIGURATION)
    (folder / "modeling_custom.py").write_text(MODELING)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="llmp_custom", architectures=["CustomForCausalLM"], auto_map={
        "AutoConfig": "configuration_custom.CustomConfig",
        "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
        "AutoModelForSequenceClassification": "modeling_custom.CustomForSequenceClassification"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


REFUSED = r"ships its own Python code .* trust_remote_code: true"


def test_the_loaders_refuse_shipped_code_unless_trusted(custom_model):
    from llm_platform.models.loading import load_causal_lm, load_model_config, load_sequence_classifier

    for load in (load_model_config, load_causal_lm, load_sequence_classifier):
        with pytest.raises(ConfigError, match=REFUSED):
            load(str(custom_model))
    assert type(load_model_config(str(custom_model), trust_remote_code=True)).__name__ == "CustomConfig"
    assert type(load_causal_lm(str(custom_model), trust_remote_code=True)).__name__ == "CustomForCausalLM"


def test_sft_checks_inputs_and_builds_with_the_setting(custom_model):
    from llm_platform.training.config import SFTConfig
    from llm_platform.training.methods import build_model
    from llm_platform.training.sft_job import check_inputs

    cfg = SFTConfig(model=str(custom_model), method="lora", data={"train_limit": 8, "eval_limit": 8})
    with pytest.raises(ConfigError, match=REFUSED):
        check_inputs(cfg)  # on the driver, before any worker starts
    with pytest.raises(ConfigError, match=REFUSED):
        build_model(cfg)
    trusted = cfg.model_copy(update={"trust_remote_code": True})
    check_inputs(trusted)
    assert type(build_model(trusted).get_base_model()).__name__ == "CustomForCausalLM"


def test_reward_ppo_and_the_engine_build_with_the_setting(custom_model, loop, tmp_path):
    from llm_platform.alignment.config import RewardJobConfig, RLHFConfig
    from llm_platform.alignment.reward import RewardScorer
    from llm_platform.alignment.reward_job import build_reward_model
    from llm_platform.alignment.rlhf_job import build_policy, prepare
    from llm_platform.engine import EngineConfig, SamplingParams
    from llm_platform.engine.hf_engine import TransformersEngine

    reward = RewardJobConfig(model=str(custom_model))
    with pytest.raises(ConfigError, match=REFUSED):
        build_reward_model(reward)
    model, _ = build_reward_model(reward.model_copy(update={"trust_remote_code": True}))
    assert type(model).__name__ == "CustomForSequenceClassification"
    with pytest.raises(ConfigError, match=REFUSED):
        RewardScorer(str(custom_model))  # the PPO reward actor's scorer
    assert type(RewardScorer(str(custom_model), trust_remote_code=True).model).__name__ == \
        "CustomForSequenceClassification"

    policy = RLHFConfig(policy_model=str(custom_model), reward_model=str(custom_model), output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=REFUSED):
        prepare(policy)  # on the driver, before any worker or actor starts
    with pytest.raises(ConfigError, match=REFUSED):
        build_policy(policy)
    prepare(policy.model_copy(update={"trust_remote_code": True}))
    model, _ = build_policy(policy.model_copy(update={"trust_remote_code": True}))
    assert type(model.policy.get_base_model()).__name__ == "CustomForCausalLM"

    with pytest.raises(ConfigError, match=REFUSED):
        TransformersEngine(EngineConfig(model=str(custom_model), kind="transformers"))
    engine = TransformersEngine(EngineConfig(model=str(custom_model), kind="transformers", trust_remote_code=True))
    assert type(engine.model).__name__ == "CustomForCausalLM"
    result = loop.run(engine.generate([1, 5, 9], SamplingParams(temperature=0.0, max_tokens=3)))
    assert len(result.choices[0].token_ids) == 3


def test_the_setting_is_in_every_config_and_off_by_default():
    from llm_platform.alignment.config import DPOJobConfig, RewardJobConfig, RLHFConfig
    from llm_platform.engine import EngineConfig
    from llm_platform.serving.config import ServeConfig
    from llm_platform.training.config import SFTConfig

    for cls in (SFTConfig, RewardJobConfig, DPOJobConfig, RLHFConfig, EngineConfig):
        assert cls.model_fields["trust_remote_code"].default is False, cls.__name__
    serve = ServeConfig.model_validate({"models": [{"id": "m", "engine": {"model": "x", "trust_remote_code": True}}]})
    assert serve.models[0].engine.trust_remote_code
