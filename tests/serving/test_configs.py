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
