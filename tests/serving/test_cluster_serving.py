"""The server on the two-node cluster: replicas on the worker node, the adapter store on S3. An adapter
registered over HTTP is served from the worker node, which fetched it from S3 into its own private disk."""

from __future__ import annotations

import json
import os

import httpx
import pytest

from llm_platform.engine import AdapterRef, SamplingParams
from llm_platform.serving.process import ServerProcess
from tests.conftest import make_lora

# Opt-in for now: on this 2-core machine, loaded by parallel sessions, `ray start` of the worker node
# often exceeds Ray's fixed 30 s raylet registration (three tries in tests/ray_cluster.py) and these
# tests have not yet passed here end to end. LLMP_CLUSTER_TESTS=1 runs them.
pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.environ.get("LLMP_CLUSTER_TESTS") != "1",
                                                   reason="two-node cluster tests are opt-in (LLMP_CLUSTER_TESTS=1)")]
ADMIN = {"Authorization": "Bearer cluster-admin-key"}
PROMPT = "Review: The lamp is lovely. Is this review positive or negative?\nAnswer:"

WHERE = """
import json, os, ray
from ray.util.state import list_actors
ray.init(logging_level="ERROR")
replicas = list_actors(filters=[("class_name", "=", "ServeReplica:llm-platform:model-tiny-s"), ("state", "=", "ALIVE")])
head = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) == 0]

@ray.remote(num_cpus=0, resources={{"worker_node": 0.01}})
def cached():
    return [f for _, _, files in os.walk({cache!r}) for f in files]

print("WHERE", json.dumps({{"replica_nodes": [a.node_id for a in replicas], "head": head, "cached": ray.get(cached.remote())}}))
"""


def test_server_on_the_worker_node_serves_an_adapter_from_s3(ray_cluster, s3, tiny_models, engines, loop, tmp_path):
    lora = make_lora(tiny_models["tiny-s"], tmp_path / "lora", seed=404)
    expected = loop.run(engines("tiny-s", "transformers").generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=24), AdapterRef("x", "lora", str(lora)))).choices[0].text
    config = {"adapter_store": s3.uri("cluster-store"), "adapter_sync_s": 0.5,
              "models": [{"id": "tiny-s", "engine": {"model": str(tiny_models["tiny-s"]), "kind": "vllm",
                                                     "max_model_len": 512}, "num_cpus": 1, "max_adapters": 2}]}
    # The driver (`llmp serve`) has the store's endpoint and keys; the cluster's nodes do not.
    server = ServerProcess(config, tmp_path / "server",
                           env={**ray_cluster.env, **s3.env, "LLMP_ADMIN_KEY": ADMIN["Authorization"].split()[1]})
    server.start()
    try:
        registered = httpx.post(f"{server.url}/v1/adapters", headers=ADMIN, timeout=120, json={
            "name": "c", "base": "tiny-s", "kind": "lora", "source": str(lora)})
        assert registered.status_code == 201, registered.text
        got = httpx.post(f"{server.url}/v1/completions", timeout=120, json={
            "model": "tiny-s:c", "prompt": PROMPT, "max_tokens": 24, "temperature": 0})
        assert got.status_code == 200, got.text
        assert got.json()["choices"][0]["text"] == expected

        cache = ray_cluster.worker_private / "llmp-adapter-cache"
        result = ray_cluster.python(WHERE.format(cache=str(cache)))
        assert result.returncode == 0, result.stderr[-3000:]
        where = json.loads(next(x for x in result.stdout.splitlines() if x.startswith("WHERE "))[6:])
        assert where["replica_nodes"] and where["head"][0] not in where["replica_nodes"]  # replicas on the worker
        assert set(where["cached"]) == {"adapter_config.json", "adapter_model.safetensors"}  # fetched there ...
        assert not cache.exists()  # ... on the worker node's private disk, which the head cannot see
    finally:
        assert server.stop() == 0
