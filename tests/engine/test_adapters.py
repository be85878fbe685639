import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from llm_platform.engine.adapters import inspect_adapter, load_soft_prompt
from llm_platform.errors import AdapterError


@pytest.fixture(scope="module")
def configs(tiny_models):
    return {name: AutoConfig.from_pretrained(path) for name, path in tiny_models.items()}


def test_valid_adapters_are_described(adapters, configs):
    lora = inspect_adapter(adapters["tiny-s"]["lora"], configs["tiny-s"])
    assert (lora.kind, lora.rank, lora.target_modules) == ("lora", 8, ("down_proj", "o_proj", "q_proj", "v_proj"))
    soft = inspect_adapter(adapters["tiny-m"]["soft_prompt"], configs["tiny-m"], expected_kind="soft_prompt")
    assert (soft.kind, soft.num_virtual_tokens) == ("soft_prompt", 8)
    assert load_soft_prompt(adapters["tiny-m"]["soft_prompt"]).shape == (8, configs["tiny-m"].hidden_size)


def test_adapters_for_another_base_are_refused_by_shape(adapters, configs):
    with pytest.raises(AdapterError, match=r"_proj lora_[AB] has shape \[\d+, \d+\], the base needs \[\d+, \d+\]"):
        inspect_adapter(adapters["tiny-s"]["lora"], configs["tiny-m"])
    with pytest.raises(AdapterError, match=r"soft prompt has shape \[8, 256\], the base needs \[num_virtual_tokens, 512\]"):
        inspect_adapter(adapters["tiny-m"]["soft_prompt"], configs["tiny-l"])
    # tiny-m has 6 layers, tiny-s only 2: layer 5 does not exist there.
    with pytest.raises(AdapterError):
        inspect_adapter(adapters["tiny-m"]["lora"], configs["tiny-s"])


def test_rank_above_the_configured_maximum_is_refused(adapters, configs):
    with pytest.raises(AdapterError, match=r"LoRA rank 8 is above this model's max_lora_rank 4; serving it needs "
                                           r"engine.max_lora_rank >= 8"):
        inspect_adapter(adapters["tiny-s"]["lora"], configs["tiny-s"], max_rank=4)


def test_per_module_ranks_are_checked_module_by_module(tiny_models, configs, tmp_path: Path):
    """PEFT's ``rank_pattern``: the adapter's rank is its largest, and each module's weights have its own."""
    from tests.conftest import make_lora

    path = make_lora(tiny_models["tiny-s"], tmp_path / "pattern", seed=0, rank=8, rank_pattern={"down_proj": 16})
    info = inspect_adapter(path, configs["tiny-s"], max_rank=16)
    assert info.rank == 16 and "down_proj" in info.target_modules
    with pytest.raises(AdapterError, match=r"LoRA rank 16 is above this model's max_lora_rank 8"):
        inspect_adapter(path, configs["tiny-s"], max_rank=8)
    config = json.loads((path / "adapter_config.json").read_text())  # a pattern its weights do not follow
    (path / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": {"down_proj": 8}}))
    with pytest.raises(AdapterError, match=r"down_proj lora_A has shape \[16, \d+\], the base needs \[8, \d+\]"):
        inspect_adapter(path, configs["tiny-s"], max_rank=16)


def test_kind_mismatch_and_unsupported_types(adapters, configs, tmp_path: Path):
    with pytest.raises(AdapterError, match="is a lora adapter, not soft_prompt"):
        inspect_adapter(adapters["tiny-s"]["lora"], configs["tiny-s"], expected_kind="soft_prompt")
    ia3 = shutil.copytree(adapters["tiny-s"]["lora"], tmp_path / "ia3")
    config = json.loads((ia3 / "adapter_config.json").read_text())
    (ia3 / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(AdapterError, match="peft_type 'IA3' is not supported"):
        inspect_adapter(ia3, configs["tiny-s"])


def test_pickled_weights_are_refused(tiny_models, configs, tmp_path: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_models["tiny-s"]),
                           LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert (tmp_path / "pickled" / "adapter_model.bin").is_file()
    with pytest.raises(AdapterError, match=r"pickled weights \(adapter_model.bin\)"):
        inspect_adapter(tmp_path / "pickled", configs["tiny-s"])


def test_corrupt_and_missing_files_are_reported(adapters, configs, tmp_path: Path):
    corrupt = shutil.copytree(adapters["tiny-s"]["lora"], tmp_path / "corrupt")
    data = (corrupt / "adapter_model.safetensors").read_bytes()
    (corrupt / "adapter_model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(AdapterError, match="corrupt or unreadable"):
        inspect_adapter(corrupt, configs["tiny-s"])
    (corrupt / "adapter_model.safetensors").write_bytes(data)
    (corrupt / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        inspect_adapter(corrupt, configs["tiny-s"])
    with pytest.raises(AdapterError, match="does not exist"):
        inspect_adapter(tmp_path / "nowhere", configs["tiny-s"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="has no adapter_model.safetensors"):
        inspect_adapter(tmp_path / "empty", configs["tiny-s"])


def _with_config(src: Path, out: Path, **changes) -> Path:
    folder = shutil.copytree(src, out)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return folder


@pytest.mark.parametrize("changes, message", [
    ({"r": "x"}, "field 'r': Input should be a valid integer"),
    ({"r": 8.5}, "field 'r'"),
    ({"r": True}, "field 'r'"),
    ({"r": None}, "field 'r'"),
    ({"r": 0}, "field 'r': Input should be greater than or equal to 1"),
    ({"lora_alpha": "big"}, "field 'lora_alpha'"),
    ({"target_modules": 5}, "field 'target_modules"),
    ({"peft_type": ["LORA"]}, "peft_type \\['LORA'\\] is not supported"),
    ({"use_dora": True}, "sets use_dora, which vLLM cannot serve"),
    ({"bias": "all"}, "sets bias"),
    ({"rank_pattern": {"q_proj": "x"}}, "field 'rank_pattern.q_proj'"),
    ({"rank_pattern": {"q_proj": 0}}, "field 'rank_pattern.q_proj': Input should be greater than or equal to 1"),
    ({"rank_pattern": {"q_proj(": 8}}, "rank_pattern key 'q_proj\\(' is not a valid pattern"),
])
def test_malformed_lora_config_fields_are_named(adapters, configs, tmp_path: Path, changes, message):
    folder = _with_config(adapters["tiny-s"]["lora"], tmp_path / "bad", **changes)
    with pytest.raises(AdapterError, match=message):
        inspect_adapter(folder, configs["tiny-s"])


def test_malformed_soft_prompt_fields_and_too_many_virtual_tokens(adapters, configs, tiny_models, tmp_path: Path):
    from tests.conftest import make_soft_prompt

    folder = _with_config(adapters["tiny-s"]["soft_prompt"], tmp_path / "bad", num_transformer_submodules="two")
    with pytest.raises(AdapterError, match="field 'num_transformer_submodules'"):
        inspect_adapter(folder, configs["tiny-s"])
    long = make_soft_prompt(tiny_models["tiny-s"], tmp_path / "long", seed=3, tokens=40)
    assert inspect_adapter(long, configs["tiny-s"], max_soft_prompt_tokens=40).num_virtual_tokens == 40
    with pytest.raises(AdapterError, match="40 virtual tokens; at most 16 are accepted"):
        inspect_adapter(long, configs["tiny-s"], max_soft_prompt_tokens=16)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_weights_are_refused(adapters, configs, tmp_path: Path, value):
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(adapters["tiny-s"]["lora"], tmp_path / "poisoned")
    tensors = load_file(folder / "adapter_model.safetensors")
    key = sorted(tensors)[3]
    tensors[key][0, 0] = value
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=f"tensor '{key}' holds 1 NaN or infinite values"):
        inspect_adapter(folder, configs["tiny-s"])


def test_integer_weights_are_refused(adapters, configs, tmp_path: Path):
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(adapters["tiny-s"]["lora"], tmp_path / "ints")
    tensors = {k: v.to(torch.int32) for k, v in load_file(folder / "adapter_model.safetensors").items()}
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="has dtype I32"):
        inspect_adapter(folder, configs["tiny-s"])
