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
