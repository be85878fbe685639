"""A real server (`llmp serve`, vLLM, tiny-s only) whose adapter store is ``s3://`` on a real S3 server
(SeaweedFS): register, replace, concurrent registrations, delete, register the same name again,
restart, serve — all over HTTP."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pyarrow.fs as pafs
import pytest

from llm_platform.engine import AdapterRef, SamplingParams
from llm_platform.serving.process import ServerProcess
from llm_platform.storage import open_filesystem
from tests.conftest import make_lora

pytestmark = pytest.mark.slow
ADMIN = {"Authorization": "Bearer s3-admin-key"}
PROMPT = "Review: The lamp is lovely. Is this review positive or negative?\nAnswer:"


@pytest.fixture(scope="module")
def s3_server(s3, tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("s3-server")
    store = s3.uri("adapter-store")
    sources = s3.uri("sources")
    config = {"adapter_store": store, "adapter_sync_s": 0.5,
              "adapter_sources": [sources, str(tmp_path_factory.getbasetemp())],
              "models": [{"id": "tiny-s", "engine": {"model": str(tiny_models["tiny-s"]), "kind": "vllm",
                                                     "max_model_len": 512}, "num_cpus": 0.5, "max_adapters": 4}]}
    server = ServerProcess(config, root, env={**s3.env, "LLMP_ADMIN_KEY": ADMIN["Authorization"].split()[1]})
    server.store, server.sources = store, sources
    server.start()
    yield server
    server.stop()


def register(server, name, source) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/adapters", headers=ADMIN, timeout=120,
                      json={"name": name, "base": "tiny-s", "kind": "lora", "source": str(source)})


def complete(server, model) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", timeout=120,
                      json={"model": model, "prompt": PROMPT, "max_tokens": 24, "temperature": 0})


def upload(local: Path, uri: str) -> str:
    fs, path = open_filesystem(uri)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return uri


def test_adapter_lifecycle_on_an_s3_store(s3_server, s3, tiny_models, engines, loop, tmp_path):
    loras = {tag: make_lora(tiny_models["tiny-s"], tmp_path / tag, seed=seed)
             for tag, seed in (("v1", 301), ("v2", 302), ("v3", 303))}
    engine = engines("tiny-s", "transformers")
    expected = {tag: loop.run(engine.generate(PROMPT, SamplingParams(temperature=0, max_tokens=24),
                                              AdapterRef(f"s3-test-{tag}", "lora", str(path)))).choices[0].text
                for tag, path in loras.items()}
    assert len(set(expected.values())) == 3

    # Register from an s3:// source, replace from a local folder: each version serves its own weights.
    first = register(s3_server, "a", upload(loras["v1"], f"{s3_server.sources}/v1"))
    assert first.status_code == 201, first.text
    assert first.json()["version"] == 1
    assert complete(s3_server, "tiny-s:a").json()["choices"][0]["text"] == expected["v1"]
    second = register(s3_server, "a", loras["v2"])
    assert second.status_code == 201 and second.json()["version"] == 2
    assert complete(s3_server, "tiny-s:a").json()["choices"][0]["text"] == expected["v2"]

    # Two registrations at once: both listed (separate writers racing: see test_adapter_store.py).
    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda name: register(s3_server, name, loras["v3"]), ["b", "c"]))
    assert [r.status_code for r in both] == [201, 201]
    listed = {m["id"] for m in httpx.get(f"{s3_server.url}/v1/adapters", headers=ADMIN).json()["data"]}
    assert listed == {"tiny-s:a", "tiny-s:b", "tiny-s:c"}

    # Delete, then the same name again: a new version (numbering continues), served.
    assert httpx.delete(f"{s3_server.url}/v1/adapters/tiny-s:a", headers=ADMIN).status_code == 200
    assert complete(s3_server, "tiny-s:a").status_code == 404
    again = register(s3_server, "a", loras["v3"])
    assert again.status_code == 201, again.text
    assert again.json()["version"] > 2
    assert complete(s3_server, "tiny-s:a").json()["choices"][0]["text"] == expected["v3"]

    # Everything lives in the bucket (records and files); a restarted server serves it.
    fs, root = open_filesystem(s3_server.store)
    files = [i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if i.type == pafs.FileType.File]
    # a's v1 and v2 were pruned once v4 came (behind the deletion): only the three current folders remain
    assert sum(f.endswith("adapter_model.safetensors") for f in files) == 3
    assert s3_server.stop() == 0
    s3_server.start()
    models = {m["id"]: m for m in httpx.get(f"{s3_server.url}/v1/models", timeout=30).json()["data"]}
    assert {"tiny-s:a", "tiny-s:b", "tiny-s:c"} <= set(models)
    assert models["tiny-s:a"]["version"] == again.json()["version"]
    assert complete(s3_server, "tiny-s:a").json()["choices"][0]["text"] == expected["v3"]
    assert complete(s3_server, "tiny-s:b").json()["choices"][0]["text"] == expected["v3"]
