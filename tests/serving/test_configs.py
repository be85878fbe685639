from pathlib import Path

import pytest
import yaml
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from llm_platform.config import load_config
from llm_platform.errors import ConfigError
from llm_platform.serving.config import ServeConfig
from serve_apps.openai_app import build_app

CONFIGS = Path(__file__).resolve().parents[2] / "serve_apps" / "configs"


def test_local_config_serves_the_three_tiny_models_on_vllm():
    config = load_config(ServeConfig, CONFIGS / "local.yaml")
    assert [m.id for m in config.models] == ["tiny-s", "tiny-m", "tiny-l"]
    assert {m.engine.kind for m in config.models} == {"vllm"} and config.build_tiny_models
    # Three replicas must fit on a 2-core machine.
    assert sum(m.num_cpus for m in config.models) <= 2


def test_gpu_cluster_config_is_valid_and_uses_tensor_parallelism():
    config = load_config(ServeConfig, CONFIGS / "gpu_cluster.yaml")
    big = config.models[-1]
    assert big.engine.tensor_parallel_size == 8 and big.num_gpus == 8 and big.engine.dtype == "bfloat16"
    assert config.adapter_store.startswith("s3://")
    with pytest.raises(ConfigError, match="tensor_parallel_size 8 needs num_gpus >= 8"):
        load_config(ServeConfig, CONFIGS / "gpu_cluster.yaml", ["models=" + yaml.safe_dump(
            [{**big.model_dump(exclude_none=True), "num_gpus": 4}], default_flow_style=True).strip()])


def test_config_typos_are_named():
    with pytest.raises(ConfigError, match="adapter_stor: unknown key"):
        load_config(ServeConfig, CONFIGS / "local.yaml", ["adapter_stor=/tmp/x"])
    with pytest.raises(ConfigError, match=r"models\.0\.engine\.kind"):
        load_config(ServeConfig, CONFIGS / "local.yaml", ["models=[{id: a, engine: {model: m, kind: vlm}}]"])


def test_serve_config_file_matches_rays_schema_and_builds_the_app(tiny_models, tmp_path):
    schema = ServeDeploySchema.model_validate(yaml.safe_load((CONFIGS / "serve_local.yaml").read_text()))
    app_args = schema.applications[0].args
    assert schema.applications[0].import_path == "serve_apps.openai_app:build_app"
    app = build_app({"config": str(CONFIGS.parents[1] / app_args["config"]),
                     "overrides": [f"build_tiny_models={tiny_models['tiny-s'].parent}",
                                   f"adapter_store={tmp_path / 'store'}"]})
    assert isinstance(app, Application)


def test_a_transformers_engine_runs_where_its_gpus_are():
    """vLLM picks its own platform; the transformers engine's device must match the replica's GPUs, or it
    would hold a GPU and run on the CPU."""
    model = {"id": "a", "engine": {"model": "m", "kind": "transformers"}, "num_gpus": 1}
    with pytest.raises(ConfigError, match="needs engine.device: cuda"):
        load_config(ServeConfig, CONFIGS / "local.yaml", ["models=" + yaml.safe_dump([model], default_flow_style=True).strip()])
    model["engine"]["device"] = "cuda"
    assert load_config(ServeConfig, CONFIGS / "local.yaml",
                       ["models=" + yaml.safe_dump([model], default_flow_style=True).strip()]).models[0].num_gpus == 1


def test_max_lora_rank_follows_the_registered_adapters(tiny_models, tmp_path):
    """Unset, a model's max_lora_rank is the smallest rank vLLM takes that holds its registered LoRAs (floor 64);
    a configured one is kept; an adapter above it is refused naming max_lora_rank and the rank to set."""
    from vllm.config.lora import LoRAConfig

    from llm_platform.engine.adapters import inspect_adapter
    from llm_platform.errors import AdapterError
    from llm_platform.models.loading import load_model_config
    from llm_platform.serving.adapter_store import AdapterStore
    from llm_platform.serving.app import prepare
    from tests.conftest import make_lora, make_soft_prompt

    store = AdapterStore(str(tmp_path / "store"))
    rank_100 = make_lora(tiny_models["tiny-s"], tmp_path / "r100", seed=0, rank=100, targets=("q_proj",))
    store.put("tiny-s", "big", "lora", rank_100)
    store.put("tiny-s", "small", "lora", make_lora(tiny_models["tiny-s"], tmp_path / "r4", seed=1, rank=4,
                                                    targets=("q_proj",)))
    store.put("tiny-m", "soft", "soft_prompt", make_soft_prompt(tiny_models["tiny-m"], tmp_path / "sp", seed=2))
    models = [{"id": size, "engine": {"model": str(path), "kind": "vllm"}} for size, path in tiny_models.items()]
    models[2]["engine"]["max_lora_rank"] = 8  # configured: kept, although tiny-s needs more
    config = ServeConfig.model_validate({"adapter_store": str(tmp_path / "store"), "models": models})
    ranks = {m.id: m.engine.max_lora_rank for m in prepare(config).models}
    assert ranks == {"tiny-s": 128, "tiny-m": 64, "tiny-l": 8}  # 100 -> 128: vLLM takes no rank 100
    for rank in ranks.values():
        assert LoRAConfig(max_lora_rank=rank).max_lora_rank == rank

    with pytest.raises(AdapterError, match=r"rank 100 is above this model's max_lora_rank 64; serving it needs "
                                           r"engine\.max_lora_rank >= 128"):
        inspect_adapter(rank_100, load_model_config(str(tiny_models["tiny-s"])), max_rank=64)
    assert inspect_adapter(rank_100, load_model_config(str(tiny_models["tiny-s"])), max_rank=128).rank == 100
