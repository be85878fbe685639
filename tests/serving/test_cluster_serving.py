"""The server on the two-node cluster, as users run it: ``llmp serve`` joins the cluster, its replicas
run on the worker node, the adapter store is ``s3://`` on a real S3 server (SeaweedFS), and only the
launching process has the store's endpoint and keys. Over HTTP: register (from an ``s3://`` source and
from a folder), replace while clients are being served, two registrations at once, delete, register
the same name again, restart, serve; then the store stops answering, and only adapter requests notice (a
bounded wait, then 503). The worker node fetched each adapter from S3 into its own disk."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pyarrow.fs as pafs
import pytest

from llm_platform.engine import AdapterRef, SamplingParams
from llm_platform.serving.ingress import STORE_WAIT_S
from llm_platform.serving.process import ServerProcess
from llm_platform.storage import open_filesystem
from tests.conftest import make_lora

pytestmark = pytest.mark.slow
ADMIN = {"Authorization": "Bearer cluster-admin-key"}
PROMPT = "Review: The lamp is lovely. Is this review positive or negative?\nAnswer:"

WHERE = """
import json, ray
from ray.util.state import list_actors
ray.init(logging_level="ERROR")
replicas = list_actors(filters=[("class_name", "=", "ServeReplica:llm-platform:model-tiny-s"), ("state", "=", "ALIVE")])
head = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) == 0]
print("WHERE", json.dumps({"replica_nodes": [a.node_id for a in replicas], "head": head}))
"""


@pytest.fixture(scope="module")
def cluster_server(ray_cluster, s3, tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster-server")
    store, sources = s3.uri("adapter-store"), s3.uri("sources")
    config = {"adapter_store": store, "adapter_sync_s": 0.5,
              "adapter_sources": [sources, str(tmp_path_factory.getbasetemp())],
              "models": [{"id": "tiny-s", "engine": {"model": str(tiny_models["tiny-s"]), "kind": "vllm",
                                                     "max_model_len": 512}, "num_cpus": 1, "max_adapters": 4}]}
    # RAY_ADDRESS (in the cluster's env) makes `llmp serve` join the cluster; the S3 variables are the
    # launching process's only: the replicas on the worker node get them from it.
    server = ServerProcess(config, root, env={**ray_cluster.env, **s3.env,
                                              "LLMP_ADMIN_KEY": ADMIN["Authorization"].split()[1]})
    server.store, server.sources = store, sources
    server.start()
    yield server
    server.stop()


def register(server, name, source, kind="lora") -> httpx.Response:
    return httpx.post(f"{server.url}/v1/adapters", headers=ADMIN, timeout=120,
                      json={"name": name, "base": "tiny-s", "kind": kind, "source": str(source)})


def complete(server, model) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", timeout=120,
                      json={"model": model, "prompt": PROMPT, "max_tokens": 24, "temperature": 0})


def upload(local: Path, uri: str) -> str:
    fs, path = open_filesystem(uri)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return uri


def test_adapter_lifecycle_on_the_worker_node_with_an_s3_store(cluster_server, ray_cluster, s3, tiny_models,
                                                                adapters, engines, loop, tmp_path):
    loras = {tag: make_lora(tiny_models["tiny-s"], tmp_path / tag, seed=seed)
             for tag, seed in (("v1", 301), ("v2", 302), ("v3", 303))}
    engine = engines("tiny-s", "transformers")
    expected = {tag: loop.run(engine.generate(PROMPT, SamplingParams(temperature=0, max_tokens=24),
                                              AdapterRef(f"s3-test-{tag}", "lora", str(path)))).choices[0].text
                for tag, path in loras.items()}
    soft_prompt = adapters["tiny-s"]["soft_prompt"]
    expected["soft"] = loop.run(engine.generate(PROMPT, SamplingParams(temperature=0, max_tokens=24),
                                                AdapterRef("s3-test-soft", "soft_prompt", str(soft_prompt)))
                                ).choices[0].text
    assert len(set(expected.values())) == 4

    # Register from an s3:// source; the replicas run on the worker node, which cached it on its own disk.
    first = register(cluster_server, "a", upload(loras["v1"], f"{cluster_server.sources}/v1"))
    assert first.status_code == 201, first.text
    assert first.json()["version"] == 1
    assert complete(cluster_server, "tiny-s:a").json()["choices"][0]["text"] == expected["v1"]
    result = ray_cluster.python(WHERE)
    assert result.returncode == 0, result.stderr[-3000:]
    where = json.loads(next(x for x in result.stdout.splitlines() if x.startswith("WHERE "))[6:])
    assert where["replica_nodes"] and where["head"][0] not in where["replica_nodes"]
    cache = ray_cluster.worker_private / "llmp-adapter-cache"
    assert {Path(f).name for f in ray_cluster.worker_files(cache)} >= {"adapter_config.json",
                                                                       "adapter_model.safetensors"}
    assert not cache.exists()  # on the worker node's private disk, which the head cannot see

    # Replace from a folder while clients are being served: every answer is v1's or v2's, none fails,
    # and once the registration has returned, every answer is v2's.
    answers, stop = [], threading.Event()

    def client():
        while not stop.is_set():
            r = complete(cluster_server, "tiny-s:a")
            answers.append((r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text))

    clients = [threading.Thread(target=client) for _ in range(3)]
    for c in clients:
        c.start()
    second = register(cluster_server, "a", loras["v2"])
    after = complete(cluster_server, "tiny-s:a").json()["choices"][0]["text"]
    stop.set()
    for c in clients:
        c.join()
    assert second.status_code == 201 and second.json()["version"] == 2, second.text
    assert after == expected["v2"]
    assert answers and all(code == 200 and text in (expected["v1"], expected["v2"]) for code, text in answers), \
        answers

    # Two registrations at once: both listed (separate writers racing: see test_adapter_store.py).
    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda name: register(cluster_server, name, loras["v3"]), ["b", "c"]))
    assert [r.status_code for r in both] == [201, 201]
    listed = {m["id"] for m in httpx.get(f"{cluster_server.url}/v1/adapters", headers=ADMIN).json()["data"]}
    assert listed == {"tiny-s:a", "tiny-s:b", "tiny-s:c"}

    # Delete, then the same name again: a new version (numbering continues), served.
    assert httpx.delete(f"{cluster_server.url}/v1/adapters/tiny-s:a", headers=ADMIN).status_code == 200
    assert complete(cluster_server, "tiny-s:a").status_code == 404
    again = register(cluster_server, "a", loras["v3"])
    assert again.status_code == 201, again.text
    assert again.json()["version"] > 2
    assert complete(cluster_server, "tiny-s:a").json()["choices"][0]["text"] == expected["v3"]

    # A soft prompt beside the LoRAs; it survives the restart as they do.
    assert register(cluster_server, "soft", soft_prompt, kind="soft_prompt").status_code == 201
    assert complete(cluster_server, "tiny-s:soft").json()["choices"][0]["text"] == expected["soft"]

    # Everything lives in the bucket (records and files); a restarted server serves it.
    fs, root = open_filesystem(cluster_server.store)
    files = [i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if i.type == pafs.FileType.File]
    # a's v1 and v2 were pruned once v4 came (behind the deletion): only the three current folders remain
    assert sum(f.endswith("adapter_model.safetensors") for f in files) == 3 + 1  # + the soft prompt
    assert cluster_server.stop() == 0
    cluster_server.start()
    models = {m["id"]: m for m in httpx.get(f"{cluster_server.url}/v1/models", timeout=30).json()["data"]}
    assert {"tiny-s:a", "tiny-s:b", "tiny-s:c", "tiny-s:soft"} <= set(models)
    assert models["tiny-s:a"]["version"] == again.json()["version"]
    assert complete(cluster_server, "tiny-s:a").json()["choices"][0]["text"] == expected["v3"]
    assert complete(cluster_server, "tiny-s:b").json()["choices"][0]["text"] == expected["v3"]
    assert complete(cluster_server, "tiny-s:soft").json()["choices"][0]["text"] == expected["soft"]

    # The store stops answering (its server process stopped): base requests are served as before, an adapter
    # request waits for the store no longer than the ingress's bound and gets a 503 with Retry-After, and
    # all recovers once the store answers again.
    base_text = complete(cluster_server, "tiny-s").json()["choices"][0]["text"]
    time.sleep(1)  # the ingress's manifest (adapter_sync_s 0.5) is due for a re-read
    os.killpg(s3.process.pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(1) as pool:
            stalled = pool.submit(timed, complete, cluster_server, "tiny-s:b")
            time.sleep(0.5)  # its manifest read is under way, and stuck
            base, base_s = timed(complete, cluster_server, "tiny-s")
            adapter, adapter_s = stalled.result()
    finally:
        os.killpg(s3.process.pid, signal.SIGCONT)
    assert base.status_code == 200 and base.json()["choices"][0]["text"] == base_text and base_s < 3, base_s
    assert adapter.status_code == 503, adapter.text
    assert adapter.json()["error"]["code"] == "adapter_store_unavailable" and "retry-after" in adapter.headers
    assert adapter_s < STORE_WAIT_S + 5, adapter_s
    assert complete(cluster_server, "tiny-s:b").json()["choices"][0]["text"] == expected["v3"]


def timed(fn, *args):
    start = time.monotonic()
    return fn(*args), time.monotonic() - start
