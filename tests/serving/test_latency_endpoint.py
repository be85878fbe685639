"""`llmp eval latency` against the running server (vLLM engines behind the OpenAI endpoint), as users
point it at theirs: the streamed events are counted token by token (vLLM may put several tokens in one
chunk), so each prompt's count equals the server's own count for the same seeded request."""

from __future__ import annotations

import httpx
import pytest

from llm_platform.data.prompts import COURSE_PROMPTS
from llm_platform.evaluation import EvaluationError, latency
from tests.serving.conftest import API_KEY


@pytest.mark.slow
def test_latency_through_the_serving_endpoint(server, tiny_models, monkeypatch):
    monkeypatch.setenv("LLMP_API_KEY", API_KEY)
    cfg = latency.Config(models={"tiny-s": str(tiny_models["tiny-s"])}, endpoint=server.url,
                         sampling={"max_tokens": 24})
    summary = latency.run(cfg)
    with pytest.raises(EvaluationError, match="answered 404 for model 'tiny-x'"):
        latency.run(cfg.model_copy(update={"models": {"tiny-x": None}}))
    rows = {r["prompt"]: r for r in summary["rows"]}
    params = cfg.sampling.params(0)
    for name, prompt in COURSE_PROMPTS.items():
        answer = httpx.post(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                            timeout=120, json={"model": "tiny-s", "prompt": prompt, "max_tokens": params.max_tokens,
                                               "temperature": params.temperature, "top_p": params.top_p,
                                               "top_k": params.top_k, "seed": params.seed,
                                               "repetition_penalty": params.repetition_penalty})
        assert answer.status_code == 200, answer.text
        assert rows[name]["tokens"] == answer.json()["usage"]["completion_tokens"], name
    assert summary["source"] == f"endpoint {server.url}" and rows["average"]["params"] > 0
