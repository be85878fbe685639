"""Both engines, for real: vLLM (CPU build) and transformers + PEFT, on every tiny model."""

import asyncio

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from llm_platform.engine import AdapterRef, EngineConfig, SamplingParams, build_engine
from llm_platform.errors import ModelNotFoundError, SamplingError
from llm_platform.models.tiny import TINY_NAMES

PROMPT = "Review: The camera is superb. Is this review positive or negative?\nAnswer:"
GREEDY = SamplingParams(temperature=0, max_tokens=24)


def adapter_ref(adapters, size, kind):
    return None if kind == "base" else AdapterRef(name=f"{size}-{kind}", kind=kind, path=str(adapters[size][kind]))


def generate(loop, engine, params=GREEDY, adapter=None, prompt=PROMPT):
    return loop.run(engine.generate(prompt, params, adapter))


@pytest.mark.slow
@pytest.mark.parametrize("size", TINY_NAMES)
def test_greedy_vllm_equals_transformers_for_base_lora_and_soft_prompt(size, engines, adapters, loop):
    outputs = {}
    for kind in ("base", "lora", "soft_prompt"):
        adapter = adapter_ref(adapters, size, kind)
        vllm_out = generate(loop, engines(size, "vllm"), adapter=adapter).choices[0]
        hf_out = generate(loop, engines(size, "transformers"), adapter=adapter).choices[0]
        assert vllm_out.token_ids == hf_out.token_ids, kind
        assert vllm_out.text == hf_out.text and vllm_out.finish_reason == hf_out.finish_reason
        outputs[kind] = hf_out.token_ids
    # The adapters really act: each changes what the base model says.
    assert outputs["lora"] != outputs["base"] and outputs["soft_prompt"] != outputs["base"]


@pytest.mark.slow
def test_transformers_engine_equals_peft_generate(tiny_models, adapters, engines, loop):
    """The reference engine applies adapters exactly as PEFT itself does."""
    engine = engines("tiny-m", "transformers")
    ids = engine.encode(PROMPT)
    for kind in ("lora", "soft_prompt"):
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models["tiny-m"]),
                                               adapters["tiny-m"][kind]).eval()
        out = peft_model.generate(input_ids=torch.tensor([ids]), max_new_tokens=GREEDY.max_tokens, do_sample=False)
        expected = out[0, -GREEDY.max_tokens:].tolist()
        got = generate(loop, engine, adapter=adapter_ref(adapters, "tiny-m", kind)).choices[0].token_ids
        assert got == expected[:len(got)] and len(got) in (len(expected), expected.index(2) + 1 if 2 in expected else -1)


@pytest.mark.slow
def test_logprobs_agree_between_engines(engines, loop):
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=3)
    a = generate(loop, engines("tiny-s", "vllm"), params).choices[0]
    b = generate(loop, engines("tiny-s", "transformers"), params).choices[0]
    assert len(a.logprobs) == len(b.logprobs) == len(a.token_ids)
    assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4
    assert all(lp <= 0 for lp in a.logprobs)
    for top_a, top_b, token in zip(a.top_logprobs, b.top_logprobs, a.token_ids):
        assert token in top_a and set(top_a) == set(top_b) and len(top_a) in (3, 4)
        # Greedy picks the most likely token, so its log-probability is the top one.
        assert top_a[token] == pytest.approx(max(top_a.values()), abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vllm", "transformers"])
def test_sampling_settings(kind, engines, loop):
    engine = engines("tiny-s", kind)
    greedy = generate(loop, engine).choices[0]
    # top_k=1 keeps only the most likely token: sampling becomes greedy.
    assert generate(loop, engine, SamplingParams(temperature=1.0, top_k=1, max_tokens=24, seed=5)).choices[0].token_ids \
        == greedy.token_ids
    penalized = generate(loop, engine, SamplingParams(temperature=0, max_tokens=24, repetition_penalty=1.8)).choices[0]
    assert penalized.token_ids != greedy.token_ids
    sampled = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=11, n=3)
    first, second = generate(loop, engine, sampled), generate(loop, engine, sampled)
    assert [c.token_ids for c in first.choices] == [c.token_ids for c in second.choices]
    assert len({tuple(c.token_ids) for c in first.choices}) == 3
    other = generate(loop, engine, SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=12, n=3))
    assert [c.token_ids for c in other.choices] != [c.token_ids for c in first.choices]
    short = generate(loop, engine, SamplingParams(temperature=1.0, max_tokens=3, seed=1)).choices[0]
    assert len(short.token_ids) <= 3 and (short.finish_reason == "length") == (len(short.token_ids) == 3)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vllm", "transformers"])
def test_greedy_repetition_penalty_agrees_across_engines(kind, engines, loop):
    params = SamplingParams(temperature=0, max_tokens=24, repetition_penalty=1.5)
    reference = generate(loop, engines("tiny-m", "transformers"), params).choices[0].token_ids
    assert generate(loop, engines("tiny-m", kind), params).choices[0].token_ids == reference


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vllm", "transformers"])
def test_stop_strings_end_the_text_before_them(kind, engines, loop):
    engine = engines("tiny-s", kind)
    full = generate(loop, engine, SamplingParams(temperature=0, max_tokens=40)).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert len(stop) == 2 and stop.strip()
    cut = generate(loop, engine, SamplingParams(temperature=0, max_tokens=40, stop=(stop,))).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vllm", "transformers"])
def test_stream_yields_pieces_that_add_up_to_the_result(kind, engines, adapters, loop):
    engine = engines("tiny-s", kind)
    adapter = adapter_ref(adapters, "tiny-s", "lora")
    params = SamplingParams(temperature=0.7, max_tokens=20, n=2, seed=3)

    async def collect():
        return [chunk async for chunk in engine.stream(engine.encode(PROMPT), params, adapter)]

    chunks = loop.run(collect())
    whole = generate(loop, engine, params, adapter)
    for choice in whole.choices:
        mine = [c for c in chunks if c.index == choice.index]
        assert len(mine) > 3
        assert "".join(c.text for c in mine) == choice.text
        assert sum((c.token_ids for c in mine), []) == choice.token_ids
        assert [c.finish_reason is not None for c in mine] == [False] * (len(mine) - 1) + [True]


@pytest.mark.slow
def test_vllm_batches_mixed_adapters_without_crosstalk(engines, adapters, loop):
    """Concurrent requests for the base, a LoRA and a soft prompt each get their own output."""
    engine = engines("tiny-l", "vllm")
    kinds = ["base", "lora", "soft_prompt"] * 4
    sequential = {k: generate(loop, engine, adapter=adapter_ref(adapters, "tiny-l", k)).choices[0].token_ids
                  for k in set(kinds)}

    async def together():
        return await asyncio.gather(*(engine.generate(PROMPT, GREEDY, adapter_ref(adapters, "tiny-l", k))
                                      for k in kinds))

    for kind, result in zip(kinds, loop.run(together())):
        assert result.choices[0].token_ids == sequential[kind]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vllm", "transformers"])
def test_unloaded_adapters_reload_on_demand(kind, engines, adapters, loop):
    engine = engines("tiny-s", kind)
    adapter = adapter_ref(adapters, "tiny-s", "lora")
    before = generate(loop, engine, adapter=adapter).choices[0].token_ids
    loop.run(engine.unload_adapter(adapter))
    loop.run(engine.load_adapter(adapter))
    assert generate(loop, engine, adapter=adapter).choices[0].token_ids == before


@pytest.mark.slow
def test_bad_prompts_raise_sampling_errors(engines, loop):
    engine = engines("tiny-s", "vllm")
    with pytest.raises(SamplingError, match="prompt: has 600 tokens"):
        generate(loop, engine, prompt=[5] * 600)
    with pytest.raises(SamplingError, match="prompt: is empty"):
        generate(loop, engine, prompt=[])
    with pytest.raises(SamplingError, match=r"token ids must be in \[0, 1024\)"):
        generate(loop, engine, prompt=[1, 99999])


@pytest.mark.parametrize("kwargs, param", [
    ({"temperature": -0.1}, "temperature"), ({"temperature": 2.5}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"repetition_penalty": 0}, "repetition_penalty"), ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n"), ({"n": 2, "temperature": 0}, "n"), ({"logprobs": 21}, "logprobs"), ({"stop": ("",)}, "stop")])
def test_out_of_range_sampling_values_name_the_parameter(kwargs, param):
    with pytest.raises(SamplingError) as err:
        SamplingParams(**kwargs)
    assert err.value.param == param and str(err.value).startswith(param)


@pytest.mark.parametrize("kind", ["vllm", "transformers"])
def test_missing_model_fails_before_any_engine_starts(kind, tmp_path):
    with pytest.raises(ModelNotFoundError, match="tiny-q does not exist"):
        build_engine(EngineConfig(model=str(tmp_path / "tiny-q"), kind=kind))


@pytest.mark.slow
def test_vllm_sampling_fields_agree_between_engines(engines, loop):
    """vLLM's extra sampling fields mean the same on both engines (greedy, so outputs must match)."""
    vllm, hf = engines("tiny-s", "vllm"), engines("tiny-s", "transformers")
    plain = generate(loop, hf, SamplingParams(temperature=0, max_tokens=12)).choices[0].token_ids
    first = plain[0]
    cases = [
        {"logit_bias": ((first, -100.0),)},
        {"stop_token_ids": (plain[2],)},
        {"stop_token_ids": (first,), "min_tokens": 2},
        {"presence_penalty": 1.5, "frequency_penalty": 0.8},
        {"ignore_eos": True, "max_tokens": 40},
        {"min_p": 0.3},
    ]
    outputs = []
    for extra in cases:
        params = SamplingParams(**{"temperature": 0, "max_tokens": 12, **extra})
        a, b = generate(loop, vllm, params).choices[0], generate(loop, hf, params).choices[0]
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason, extra
        outputs.append(a.token_ids)
    assert outputs[0][0] != first and outputs[2][0] != first and len(outputs[2]) >= 2
    assert outputs[4] and len(outputs[4]) == 40
    assert generate(loop, vllm, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=(plain[2],))
                    ).choices[0].token_ids == plain[:3]
    # Prompt log-probabilities (what echo with logprobs reports): the first None, then equal on both engines.
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=1, prompt_logprobs=1)
    a, b = generate(loop, vllm, params).choices[0], generate(loop, hf, params).choices[0]
    assert a.prompt_logprobs[0] is None and b.prompt_logprobs[0] is None
    assert len(a.prompt_logprobs) == len(hf.encode(PROMPT))
    assert max(abs(x - y) for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:])) < 1e-3
    with pytest.raises(SamplingError, match="response_format"):
        generate(loop, hf, SamplingParams(temperature=0, max_tokens=4, structured={"json_object": True}))
    with pytest.raises(SamplingError, match="stop_token_ids"):
        generate(loop, vllm, SamplingParams(temperature=0, max_tokens=4, stop_token_ids=(99999,)))
