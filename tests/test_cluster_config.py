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


def _fits_one_node(workers: dict, gpus: float, cpus: float) -> bool:
    """An actor or worker (or a tensor-parallel replica) lives on one node: some worker type must hold it."""
    return any(gpus <= n["resources"]["GPU"] and cpus <= n["resources"]["CPU"] for n in workers.values())


def test_every_gpu_job_config_loads_and_fits_the_node_types():
    """Each gpu_*.yaml through its job's own config class (every setting validated, as the job would), then
    its Ray resources against cluster.yaml: each worker and actor fits a node type, all of them fit the
    cluster at full scale, and the memory settings a 7B job needs are on."""
    from llm_platform.alignment.config import DPOJobConfig, RewardJobConfig, RLHFConfig
    from llm_platform.config import load_config
    from llm_platform.training.config import SFTConfig

    jobs = {"gpu_full_fsdp.yaml": SFTConfig, "gpu_qlora.yaml": SFTConfig, "gpu_reward.yaml": RewardJobConfig,
            "gpu_dpo.yaml": DPOJobConfig, "gpu_rlhf.yaml": RLHFConfig}
    configs = CLUSTER_YAML.parent / "train_jobs" / "configs"
    assert {p.name for p in configs.glob("gpu_*.yaml")} == set(jobs)  # a new GPU config is checked here too
    _, workers = _node_types()
    cluster_gpus = sum(n["resources"]["GPU"] * n["max_workers"] for n in workers.values())
    cluster_cpus = sum(n["resources"]["CPU"] * n["max_workers"] for n in workers.values())
    for name, cls in jobs.items():
        cfg = load_config(cls, configs / name)
        scaling = cfg.scaling
        assert scaling.use_gpu and cfg.dtype == "bfloat16", name
        assert _fits_one_node(workers, 1, scaling.cpus_per_worker), name  # one GPU per Ray Train worker
        gpus, cpus = scaling.num_workers, scaling.num_workers * scaling.cpus_per_worker
        if cls is RLHFConfig:
            rollout, reward = cfg.rollout, cfg.reward_actor
            assert _fits_one_node(workers, rollout.gpus_per_worker, rollout.cpus_per_worker), name
            assert reward.num_gpus >= 1 and _fits_one_node(workers, reward.num_gpus, reward.num_cpus), name
            gpus += rollout.num_workers * rollout.gpus_per_worker + reward.num_gpus
            cpus += rollout.num_workers * rollout.cpus_per_worker + reward.num_cpus
            # Forward/backward in parts smaller than each worker's share of a minibatch.
            assert 1 <= cfg.ppo.micro_batch_size < cfg.ppo.minibatch_size // scaling.num_workers, name
        else:
            optim = cfg.optim
            assert cfg.gradient_checkpointing, name
            # Accumulation keeps batch_size the effective batch: whole micro-batches on every GPU.
            assert optim.gradient_accumulation_steps > 1, name
            assert optim.batch_size % (scaling.num_workers * optim.gradient_accumulation_steps) == 0, name
        assert gpus <= cluster_gpus and cpus <= cluster_cpus, (name, gpus, cpus)
        if getattr(cfg, "sharding", None) == "fsdp":  # FSDP over GPUs: NCCL needs every worker on a GPU
            assert scaling.num_workers <= cluster_gpus, name


def test_the_gpu_serve_config_loads_and_each_replica_fits_a_node_type():
    from llm_platform.config import load_config
    from llm_platform.serving.config import ServeConfig

    _, workers = _node_types()
    serve = load_config(ServeConfig, CLUSTER_YAML.parent / "serve_apps" / "configs" / "gpu_cluster.yaml")
    cluster_gpus = sum(n["resources"]["GPU"] * n["max_workers"] for n in workers.values())
    needed = 0
    for model in serve.models:
        engine = model.engine
        assert engine.kind == "vllm" and engine.dtype == "bfloat16" and not engine.trust_remote_code, model.id
        # A tensor-parallel replica spans GPUs of one node.
        assert model.num_gpus >= engine.tensor_parallel_size >= 1, model.id
        assert _fits_one_node(workers, model.num_gpus, model.num_cpus), model.id
        replicas = model.autoscaling.min_replicas if model.autoscaling else model.num_replicas
        needed += replicas * model.num_gpus
    assert needed <= cluster_gpus
