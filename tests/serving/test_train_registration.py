"""A job's freshly trained adapter reaches a running server through ``register_url``: no restart."""

from __future__ import annotations

import httpx
import pytest

from tests.serving.conftest import ADMIN_KEY
from tests.training.conftest import run_sft

pytestmark = pytest.mark.slow


def test_sft_registers_its_adapter_with_a_running_server(server, ray_local, tiny_models, engines, loop, tmp_path,
                                                         monkeypatch):
    from llm_platform.engine import AdapterRef, SamplingParams

    monkeypatch.setenv("LLMP_ADMIN_KEY", ADMIN_KEY)
    summary = run_sft("local_lora.yaml", tiny_models["tiny-s"], tmp_path, "optim.max_steps=8", "optim.save_every=0",
                      "data.eval_limit=16", "run_name=fresh", f"register_url={server.url}", "register_base=tiny-s",
                      "register_name=sft-fresh")
    assert summary["registered_as"] == "tiny-s:sft-fresh"
    models = httpx.get(f"{server.url}/v1/models", headers=server.user()).json()["data"]
    assert {"id": "tiny-s:sft-fresh", "kind": "lora", "parent": "tiny-s"}.items() <= \
        next(m for m in models if m["id"] == "tiny-s:sft-fresh").items()

    prompt = "Review: The tent is flimsy.\nIs this review positive or negative?\nAnswer:"
    reply = httpx.post(f"{server.url}/v1/completions", headers=server.user(), timeout=120,
                       json={"model": "tiny-s:sft-fresh", "prompt": prompt, "max_tokens": 8, "temperature": 0})
    assert reply.status_code == 200, reply.text
    # The reference: transformers, greedy (the engine tests hold vLLM's greedy output to it token for token), so
    # this package starts no vLLM engine of its own beside its server.
    reference = loop.run(engines("tiny-s", "transformers").generate(
        prompt, SamplingParams(temperature=0.0, max_tokens=8),
        AdapterRef(name="fresh", kind="lora", path=summary["output"])))
    assert reply.json()["choices"][0]["text"] == reference.choices[0].text
