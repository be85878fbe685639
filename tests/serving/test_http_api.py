"""The OpenAI-compatible API over real HTTP, against a real Ray Serve app on vLLM engines."""

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from openai import OpenAI

from llm_platform.engine import AdapterRef, SamplingParams
from tests.conftest import make_lora
from tests.serving.conftest import API_KEY, LIMITS, SERVER_MARK, SIZES

pytestmark = pytest.mark.slow
PROMPT = "Review: The lamp is lovely. Is this review positive or negative?\nAnswer:"


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def register(server, name, base, kind, source) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/adapters", headers=server.admin(), timeout=60,
                      json={"name": name, "base": base, "kind": kind, "source": str(source)})


def reference(engines, loop, size, prompt=PROMPT, adapter=None, max_tokens=24):
    engine = engines(size, "transformers")
    return loop.run(engine.generate(prompt, SamplingParams(temperature=0, max_tokens=max_tokens), adapter)).choices[0]


@pytest.mark.parametrize("size", SIZES)
def test_openai_client_lists_completes_chats_and_streams(size, client):
    assert size in [m.id for m in client.models.list().data]
    completion = client.completions.create(model=size, prompt=PROMPT, max_tokens=8, temperature=0)
    assert completion.choices[0].finish_reason in ("length", "stop") and completion.usage.completion_tokens >= 1
    chat = client.chat.completions.create(model=size, messages=[{"role": "user", "content": "Hi!"}], max_tokens=8,
                                          temperature=0.7, top_p=0.9, seed=1)
    assert chat.choices[0].message.role == "assistant" and chat.usage.prompt_tokens > 3
    pieces = list(client.chat.completions.create(model=size, messages=[{"role": "user", "content": "Hi!"}],
                                                 max_tokens=8, temperature=0.7, top_p=0.9, seed=1, stream=True))
    assert len(pieces) >= 2 and pieces[-1].choices[0].finish_reason is not None
    # Same seed, same settings: the streamed text equals the whole one.
    assert "".join(p.choices[0].delta.content or "" for p in pieces) == chat.choices[0].message.content


def test_greedy_http_equals_transformers_for_base_lora_and_soft_prompt(server, client, adapters, engines, loop):
    for kind in ("lora", "soft_prompt"):
        assert register(server, f"ref-{kind}", "tiny-m", kind, adapters["tiny-m"][kind]).status_code == 201
    for kind, model in [("base", "tiny-m"), ("lora", "tiny-m:ref-lora"), ("soft_prompt", "tiny-m:ref-soft_prompt")]:
        adapter = None if kind == "base" else AdapterRef(kind, kind, str(adapters["tiny-m"][kind]))
        expected = reference(engines, loop, "tiny-m", adapter=adapter)
        got = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0)
        assert got.choices[0].text == expected.text, kind
        streamed = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in streamed) == expected.text, kind
    listed = {m.id: m for m in client.models.list().data}
    assert listed["tiny-m:ref-lora"].model_extra["kind"] == "lora"
    assert listed["tiny-m:ref-soft_prompt"].model_extra["parent"] == "tiny-m"


def test_logprobs_and_sampling_parameters_pass_through(client):
    out = client.completions.create(model="tiny-s", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2)
    logprobs = out.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 6 and all(lp <= 0 for lp in logprobs.token_logprobs)
    assert "".join(logprobs.tokens) == out.choices[0].text
    chat = client.chat.completions.create(model="tiny-s", messages=[{"role": "user", "content": "Hello"}],
                                          max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    assert len(chat.choices[0].logprobs.content) == 4
    assert all(len(t.top_logprobs) == 2 for t in chat.choices[0].logprobs.content)
    many = client.completions.create(model="tiny-s", prompt=PROMPT, max_tokens=8, temperature=1.0, n=3, seed=4,
                                     extra_body={"top_k": 20, "repetition_penalty": 1.3})
    assert len(many.choices) == 3 and len({c.text for c in many.choices}) > 1
    greedy = client.completions.create(model="tiny-s", prompt=PROMPT, max_tokens=30, temperature=0).choices[0].text
    stop = greedy[10:12]
    cut = client.completions.create(model="tiny-s", prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == greedy[:greedy.index(stop)] and cut.choices[0].finish_reason == "stop"
    pieces = list(client.completions.create(model="tiny-s", prompt=PROMPT, max_tokens=7, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert pieces[-1].usage.completion_tokens == sum(len(p.choices) for p in pieces[:-1]) <= 7


def test_batched_streaming_keeps_every_piece_and_streams_as_it_goes(server):
    """The replica paces a stream's pieces into messages (llm_platform.serving.pacing): the client still gets
    one event per engine output, the same tokens and scores as the whole response, spread over the generation."""
    import time

    url, user = f"{server.url}/v1/completions", server.user()

    def streamed(body: dict) -> tuple[list[dict], list[float]]:
        events, arrivals = [], []
        with httpx.stream("POST", url, headers=user, timeout=120, json={**body, "stream": True,
                                                                         "stream_options": {"include_usage": True}}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[6:]))
                    arrivals.append(time.perf_counter())
        return events, arrivals

    # The larger model and a long answer: a generation many batching intervals long even on a fast machine
    # (tiny-s once wrote 96 tokens within one 50 ms interval).
    tokens = 200
    greedy = {"model": "tiny-m", "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
              "logprobs": 1}
    start = time.perf_counter()
    whole = httpx.post(url, headers=user, timeout=120, json=greedy).json()
    took = time.perf_counter() - start
    events, arrivals = streamed(greedy)
    pieces, usage = events[:-1], events[-1]["usage"]
    per_event = [p["choices"][0]["logprobs"]["tokens"] for p in pieces]
    assert all(len(p["choices"]) == 1 for p in pieces) and all(per_event)
    assert [t for got in per_event for t in got] == whole["choices"][0]["logprobs"]["tokens"]
    assert len(whole["choices"][0]["logprobs"]["tokens"]) == tokens
    # An event per engine output: one token each, except where vLLM merged the deltas of a request whose
    # reader fell behind the engine (RequestOutputCollector.put; vLLM's own server streams those as one event
    # too: CI once saw 199 events for 200 tokens). A paced message joined into one event would hold every
    # token of an interval (tiny-m writes tens per 50 ms), leaving a handful of events.
    assert len(pieces) >= tokens // 2, [len(got) for got in per_event]
    assert "".join(p["choices"][0]["text"] for p in pieces) == whole["choices"][0]["text"]
    assert pieces[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"] == "length"
    assert usage == whole["usage"]
    # Sent as they were generated, in several batches, not all at once at the end. (All at once is also what
    # a client starved of CPU sees: see llm_platform.serving.process.child_group.)
    reads = 1 + sum(b - a > 0.01 for a, b in zip(arrivals, arrivals[1:]))
    assert reads >= 3 and arrivals[-2] - arrivals[0] > 0.1, \
        f"{reads} reads over {arrivals[-2] - arrivals[0]:.3f} s; the whole answer took {took:.3f} s"

    # n > 1 with a seed and log-probabilities: the streamed choices add up to the whole ones.
    sampled = {"model": "tiny-s", "prompt": PROMPT, "max_tokens": 12, "temperature": 0.8, "seed": 3, "n": 2,
               "logprobs": 1}
    whole = httpx.post(url, headers=user, timeout=120, json=sampled).json()
    events, _ = streamed(sampled)
    assert events[-1]["usage"] == whole["usage"]
    for choice in whole["choices"]:
        mine = [c for e in events[:-1] for c in e["choices"] if c["index"] == choice["index"]]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert [t for c in mine for t in c["logprobs"]["tokens"]] == choice["logprobs"]["tokens"]
        assert [lp for c in mine for lp in c["logprobs"]["token_logprobs"]] == \
            pytest.approx(choice["logprobs"]["token_logprobs"], abs=1e-4)


def test_hot_swap_under_load_and_delete(server, client, tiny_models, engines, loop, tmp_path: Path):
    v1 = make_lora(tiny_models["tiny-s"], tmp_path / "v1", seed=101)
    v2 = make_lora(tiny_models["tiny-s"], tmp_path / "v2", seed=202)
    expected = {v: reference(engines, loop, "tiny-s", adapter=AdapterRef(v, "lora", str(path)), max_tokens=48).text
                for v, path in (("v1", v1), ("v2", v2))}
    assert expected["v1"] != expected["v2"]
    assert register(server, "swap", "tiny-s", "lora", v1).json()["version"] == 1

    def ask(_):
        stream = client.completions.create(model="tiny-s:swap", prompt=PROMPT, max_tokens=48, temperature=0,
                                           stream=True)
        return "".join(c.choices[0].text for c in stream)

    with ThreadPoolExecutor(24) as pool:
        in_flight = [pool.submit(ask, i) for i in range(24)]
        swapped = register(server, "swap", "tiny-s", "lora", v2)
        later = [pool.submit(ask, i) for i in range(4)]
        texts = [f.result() for f in in_flight]
        later_texts = [f.result() for f in later]
    assert swapped.status_code == 201 and swapped.json()["version"] == 2
    assert all(t in (expected["v1"], expected["v2"]) for t in texts)  # no failure, no mixture
    assert later_texts == [expected["v2"]] * 4
    assert ask(0) == expected["v2"]

    assert httpx.delete(f"{server.url}/v1/adapters/tiny-s:swap", headers=server.admin()).status_code == 200
    gone = httpx.post(f"{server.url}/v1/completions", headers=server.user(),
                      json={"model": "tiny-s:swap", "prompt": "Hi"})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert "tiny-s:swap" not in [m.id for m in client.models.list().data]


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    return body


def test_bad_requests_get_openai_shaped_4xx(server, tiny_models, adapters, tmp_path: Path):
    url, user = server.url, server.user()

    def complete(**body):
        return httpx.post(f"{url}/v1/completions", headers=user, json={"prompt": "Hi", **body}, timeout=60)

    assert error_of(complete(model="tiny-xl"), 404)["param"] == "model"
    assert error_of(complete(model="tiny-s:nope"), 404)["code"] == "model_not_found"
    for field, value in [("temperature", -1), ("top_p", 1.5), ("max_tokens", 0), ("top_k", -5), ("n", 100),
                         ("repetition_penalty", 3.0), ("logprobs", 50)]:
        assert error_of(complete(model="tiny-s", **{field: value}), 400)["param"] == field
    assert error_of(complete(model="tiny-s", n=2, temperature=0), 400)["param"] == "n"
    assert error_of(complete(model="tiny-s", prompt="word " * 2000), 400)["param"] == "prompt"
    assert error_of(httpx.post(f"{url}/v1/completions", headers={**user, "content-type": "application/json"},
                               content=b'{"model": "tiny-s", "prompt": '), 400)["code"] == "invalid_json"
    assert error_of(httpx.post(f"{url}/v1/chat/completions", headers=user, json={"model": "tiny-s"}),
                    400)["param"] == "messages"

    pickled = tmp_path / "pickled"
    shutil.copytree(adapters["tiny-s"]["lora"], pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    assert "pickled" in error_of(register(server, "pickle", "tiny-s", "lora", pickled), 422)["message"]
    assert "the base needs" in error_of(register(server, "other", "tiny-s", "lora", adapters["tiny-m"]["lora"]),
                                        422)["message"]
    assert error_of(register(server, "../../etc", "tiny-s", "lora", adapters["tiny-s"]["lora"]), 400)["param"] \
        == "name"
    assert error_of(register(server, "ghost", "tiny-s", "lora", tmp_path / "missing"), 400)["param"] == "source"
    assert error_of(register(server, "x", "tiny-q", "lora", adapters["tiny-s"]["lora"]), 404)["param"] == "base"

    assert error_of(httpx.post(f"{url}/v1/completions", json={"model": "tiny-s", "prompt": "Hi"}), 401)
    assert error_of(httpx.post(f"{url}/v1/completions", headers={"Authorization": "Bearer wrong"},
                               json={"model": "tiny-s", "prompt": "Hi"}), 401)
    assert error_of(httpx.post(f"{url}/v1/adapters", headers=user, json={
        "name": "n", "base": "tiny-s", "kind": "lora", "source": str(adapters["tiny-s"]["lora"])}), 401)
    assert error_of(httpx.delete(f"{url}/v1/adapters/tiny-s:never", headers=server.admin()), 404)

    # Still healthy and serving.
    assert httpx.get(f"{url}/healthz").status_code == 200
    assert complete(model="tiny-s", max_tokens=2).status_code == 200


def test_vllm_cpu_workers_have_their_cores_to_themselves(server):
    """vLLM binds each CPU worker's OpenMP threads to cores of their own: no other thread of the server's
    cluster (Ray's daemons, Serve's proxy, controller, ingress and replicas, vLLM's engine cores) may run there
    (llm_platform/serving/cpu_cores.py), and all of those others may still run somewhere."""
    import os

    from llm_platform.serving.cpu_cores import marked, process_cores as cores, vllm_role

    cluster = marked(SERVER_MARK, str(server.workdir))
    workers = [p for p in cluster if vllm_role(p) == "worker"]
    assert len(workers) == len([p for p in cluster if vllm_role(p) == "engine"]) == len(SIZES)  # one per engine

    engine = set().union(*(cores(w) for w in workers))
    if not set(os.sched_getaffinity(0)) - engine:
        pytest.skip(f"vLLM's workers hold every core of this machine ({sorted(engine)}): no core to keep")
    others = [p for p in cluster if p not in workers]
    assert len(others) > 10  # gcs, raylet, dashboard, agents, Serve's actors, engine cores
    shared = {" ".join(p.cmdline())[:60]: sorted(cores(p) & engine) for p in others if cores(p) & engine}
    assert not shared, (sorted(engine), shared)


def test_a_server_that_starts_its_own_cluster_runs_its_workers_at_normal_priority(server):
    """Ray starts workers at niceness 15; a cluster `llmp serve` starts for itself has its workers (Serve's proxy,
    controller, ingress and model replicas) and vLLM's processes at 0 (cluster.LOCAL_SYSTEM_CONFIG), through
    Ray's own setting, not an environment variable that the test's own processes could pass on."""
    import os

    import psutil

    from llm_platform.serving.cpu_cores import SERVE_TITLES, marked, vllm_role

    def title(process) -> str:
        try:
            return " ".join(process.cmdline())
        except psutil.Error:
            return ""

    assert "RAY_worker_niceness" not in os.environ
    cluster = marked(SERVER_MARK, str(server.workdir))
    engines = [p for p in cluster if vllm_role(p) in ("engine", "worker")]
    serve = [p for p in cluster if title(p).startswith(SERVE_TITLES)]
    assert len(engines) == 2 * len(SIZES) and len(serve) == len(SIZES) + 3  # + the ingress, the proxy, the controller
    assert {p.nice() for p in engines + serve} == {0}, {title(p)[:60]: p.nice() for p in engines + serve}


def test_platform_metrics_reach_rays_prometheus_endpoint(server, client):
    import time

    for _ in range(3):
        client.completions.create(model="tiny-m", prompt="Hello", max_tokens=5, temperature=0)
    deadline, text = time.monotonic() + 90, ""
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).text
        if "llmp_requests" in text and 'model="tiny-m"' in text and "llmp_time_to_first_token" in text:
            break
        time.sleep(3)
    lines = [line for line in text.splitlines() if line.startswith("ray_llmp_requests") and 'model="tiny-m"' in line
             and 'adapter=""' in line and 'status="ok"' in line]  # base requests (tiny-m's adapters have their own)
    assert lines and float(lines[0].rsplit(" ", 1)[1]) >= 3
    assert any(line.startswith("ray_llmp_generated_tokens") and 'model="tiny-m"' in line for line in text.splitlines())


def test_closed_by_default_authenticates_before_parsing_and_bounds_bodies(server):
    url, user = server.url, server.user()
    # Wrong or missing keys are refused before the body is read: no field errors leak to strangers.
    assert error_of(httpx.post(f"{url}/v1/completions", content=b'{"model": ', headers={
        "content-type": "application/json"}), 401)["code"] == "invalid_api_key"
    assert error_of(httpx.post(f"{url}/v1/adapters", json={"garbage": 1}), 401)["code"] == "invalid_api_key"
    assert error_of(httpx.post(f"{url}/v1/adapters", headers=user, json={"garbage": 1}), 401)
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(url + path, headers=user).status_code == 404, path
    assert httpx.get(f"{url}/health").status_code == 200  # health needs no key
    big = {"model": "tiny-s", "prompt": "x" * (LIMITS["max_request_bytes"] + 10)}
    assert error_of(httpx.post(f"{url}/v1/completions", headers=user, json=big), 413)["code"] == "request_too_large"
    assert error_of(httpx.post(f"{url}/v1/completions", headers=user, json={
        "model": "tiny-s", "prompt": "Hi", "seed": 2**63}), 400)["param"] == "seed"


def test_adapter_sources_limits_and_weights_are_checked(server, adapters, tiny_models, tmp_path: Path):
    import tempfile

    from safetensors.torch import load_file, save_file

    from tests.conftest import make_lora, make_soft_prompt

    lora = adapters["tiny-s"]["lora"]
    ssrf = register(server, "ssrf", "tiny-s", "lora", "s3://bucket/a?endpoint_override=127.0.0.1:1&scheme=http")
    assert "may not carry options" in error_of(ssrf, 403)["message"]
    assert error_of(register(server, "etc", "tiny-s", "lora", "/etc"), 403)["code"] == "source_not_allowed"
    outside = Path(tempfile.mkdtemp(prefix="llmp-test-outside-"))
    try:
        shutil.copytree(lora, outside / "lora")
        assert error_of(register(server, "out", "tiny-s", "lora", outside / "lora"), 403)["param"] == "source"
    finally:
        shutil.rmtree(outside)

    padded = shutil.copytree(lora, tmp_path / "padded")
    tensors = load_file(padded / "adapter_model.safetensors")
    save_file({**tensors, "pad": torch.zeros(LIMITS["max_adapter_bytes"] // 4 + 1)}, padded / "adapter_model.safetensors")
    assert error_of(register(server, "big", "tiny-s", "lora", padded), 413)["code"] == "adapter_too_large"

    poisoned = shutil.copytree(lora, tmp_path / "nan")
    tensors = load_file(poisoned / "adapter_model.safetensors")
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("nan")
    save_file(tensors, poisoned / "adapter_model.safetensors")
    assert "NaN or infinite" in error_of(register(server, "nan", "tiny-s", "lora", poisoned), 422)["message"]

    bad_rank = shutil.copytree(lora, tmp_path / "rank")
    config = json.loads((bad_rank / "adapter_config.json").read_text())
    (bad_rank / "adapter_config.json").write_text(json.dumps({**config, "r": "x"}))
    assert "field 'r'" in error_of(register(server, "rank", "tiny-s", "lora", bad_rank), 422)["message"]

    # The store was empty when the server started: tiny-s got max_lora_rank 64 (the floor), and says what to set.
    wide = make_lora(tiny_models["tiny-s"], tmp_path / "wide", seed=6, rank=65, targets=("q_proj",))
    message = error_of(register(server, "wide", "tiny-s", "lora", wide), 422)["message"]
    assert "max_lora_rank 64" in message and "engine.max_lora_rank >= 128" in message, message

    long = make_soft_prompt(tiny_models["tiny-s"], tmp_path / "long", seed=5, tokens=LIMITS["max_soft_prompt_tokens"] + 1)
    assert "virtual tokens" in error_of(register(server, "long", "tiny-s", "soft_prompt", long), 422)["message"]
    listed = httpx.get(f"{server.url}/v1/adapters", headers=server.admin()).json()["data"]
    assert not {"tiny-s:ssrf", "tiny-s:big", "tiny-s:nan", "tiny-s:rank", "tiny-s:long",
                "tiny-s:wide"} & {a["id"] for a in listed}


def test_keys_do_not_show_in_rays_dashboard(server):
    import re

    from tests.serving.conftest import ADMIN_KEY

    match = re.search(r"Ray dashboard: (http://\S+?)/#/serve", server.log.read_text())
    assert match, "llmp serve prints where the Ray dashboard is"
    import os

    # Ray 2.60's token authentication: the dashboard wants the cluster's token (RAY_AUTH_TOKEN or ~/.ray/auth_token).
    token_file = Path.home() / ".ray" / "auth_token"
    token = os.environ.get("RAY_AUTH_TOKEN") or (token_file.read_text().strip() if token_file.is_file() else "")
    dashboard, ray_auth = match[1], ({"Authorization": f"Bearer {token}"} if token else {})
    shown = ""
    for path in ("/api/serve/applications/", "/api/v0/actors?detail=1&limit=1000",
                 "/api/v0/tasks?detail=1&limit=1000"):
        response = httpx.get(dashboard + path, timeout=30, headers=ray_auth)
        assert response.status_code == 200, (path, response.text[:200])
        shown += response.text
    assert "llm-platform" in shown and "Ingress" in shown
    assert ADMIN_KEY not in shown and API_KEY not in shown
