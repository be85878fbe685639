from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def test_cluster_yaml_matches_rays_cluster_schema():
    # As `ray up` does: fill in the provider's defaults, then validate against ray-schema.json.
    config = prepare_config(yaml.safe_load(CLUSTER_YAML.read_text()))
    validate_config(config)
    gpu_types = [t for t in config["available_node_types"] if t != config["head_node_type"]]
    assert gpu_types and all(config["available_node_types"][t]["max_workers"] > 0 for t in gpu_types)
    assert any("[gpu]" in command for command in config["setup_commands"])


def test_schema_catches_a_typo():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    config["available_node_types"]["head"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(config))


def _node_types():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    types = config["available_node_types"]
    return types[config["head_node_type"]], {k: v for k, v in types.items() if k != config["head_node_type"]}


def test_head_does_no_work_and_workers_declare_gpus_credentials_and_types():
    head, workers = _node_types()
    assert head["resources"] == {"CPU": 0}
    for name, node in workers.items():
        resources = node["resources"]
        assert resources["GPU"] >= 1 and any(k.startswith("accelerator_type:") for k in resources), name
        # s3:// storage is reached with the instance profile, on every node that runs work.
        assert "IamInstanceProfile" in node["node_config"], name
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    assert any("--num-cpus=0" in c for c in config["head_start_ray_commands"] if "ray start" in c)
    # Set-up mirrors `make setup`: torch pinned exactly before the project, CUDA vLLM extra.
    setup = " ".join(config["setup_commands"])
    assert "torch==2.13.0" in setup and setup.index("torch==2.13.0") < setup.index('".[gpu]"')


def test_every_gpu_job_fits_a_worker_type():
    root = CLUSTER_YAML.parent
    _, workers = _node_types()
    per_gpu_cpus = [n["resources"]["CPU"] / n["resources"]["GPU"] for n in workers.values()]
    for path in sorted((root / "train_jobs" / "configs").glob("gpu_*.yaml")):
        scaling = yaml.safe_load(path.read_text())["scaling"]
        assert scaling["use_gpu"], path.name
        # One GPU per worker: its CPUs must fit beside that GPU on some worker type.
        assert any(scaling.get("cpus_per_worker", 1) <= c for c in per_gpu_cpus), path.name
    serve = yaml.safe_load((root / "serve_apps" / "configs" / "gpu_cluster.yaml").read_text())
    most_gpus = max(n["resources"]["GPU"] for n in workers.values())
    for model in serve["models"]:
        assert 1 <= model.get("num_gpus", 0) <= most_gpus, model["id"]
