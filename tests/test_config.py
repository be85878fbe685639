from pathlib import Path

import pytest

from llm_platform.config import load_config, parse_overrides
from llm_platform.demo import DemoConfig
from llm_platform.engine import EngineConfig
from llm_platform.errors import ConfigError


def test_overrides_nest_and_parse_yaml_values():
    assert parse_overrides(["a.b=3", "a.c=[x, y]", "d=true", "e=0.5"]) == {
        "a": {"b": 3, "c": ["x", "y"]}, "d": True, "e": 0.5}


def test_yaml_and_overrides_merge(tmp_path: Path):
    path = tmp_path / "engine.yaml"
    path.write_text("model: /models/tiny-s\nkind: transformers\nmax_model_len: 256\n")
    config = load_config(EngineConfig, path, ["max_model_len=128", "seed=7"])
    assert (config.model, config.kind, config.max_model_len, config.seed) == ("/models/tiny-s", "transformers", 128, 7)


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"max_lora_rnak: unknown key \(did you mean 'max_lora_rank'\?\)"):
        load_config(EngineConfig, overrides=["model=m", "max_lora_rnak=8"])


def test_bad_value_names_the_key_and_the_value():
    with pytest.raises(ConfigError, match=r"kind: .*'vllm' or 'transformers'.*got 'vlm'"):
        load_config(EngineConfig, overrides=["model=m", "kind=vlm"])
    with pytest.raises(ConfigError, match=r"max_model_len: .*greater than 0"):
        load_config(EngineConfig, overrides=["model=m", "max_model_len=0"])


def test_cross_field_check_is_reported():
    with pytest.raises(ConfigError, match=r"max_cpu_loras \(2\) must be >= max_loras \(4\)"):
        load_config(EngineConfig, overrides=["model=m", "max_cpu_loras=2"])


def test_missing_required_key_and_bad_files(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"model: Field required"):
        load_config(EngineConfig)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(EngineConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(EngineConfig, bad)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(DemoConfig, overrides=["max_tokens"])


def test_configs_are_frozen():
    config = EngineConfig(model="m")
    with pytest.raises(Exception):
        config.seed = 3
