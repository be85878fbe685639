"""Many tenants in one vLLM batch: base, several LoRA adapters and a soft prompt at once.

vLLM 0.32's own CPU LoRA path gives base rows the last LoRA slot's delta once every slot is used;
llm_platform/engine/cpu_lora_wrapper.py (loaded as a vLLM plugin) replaces it. The op tests check
that wrapper row by row against a dense per-row reference (and that the reference catches vLLM's
own wrapper); the engine tests run real vLLM, greedy, against transformers + PEFT.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from llm_platform.engine import AdapterRef, SamplingParams
from llm_platform.models.tiny import TINY_NAMES
from tests.conftest import make_lora

QV = ("q_proj", "v_proj")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# (rank, targets, rank_pattern): more adapters than the engine's max_loras (4), so slots are reused; the last
# gives its MLP down projections rank 32 beside rank 8 elsewhere (PEFT's per-module ranks).
LORA_SPECS = [(8, QV, None), (16, ALL_LINEAR, None), (64, QV, None), (64, ALL_LINEAR, None),
              (8, ALL_LINEAR, {"down_proj": 32})]
PROMPTS = ["Review: The camera is superb. Is this review positive or negative?\nAnswer:",
           "The weather today is"]
GREEDY = SamplingParams(temperature=0, max_tokens=16)


# --- the wrapper's ops against a dense per-row reference (no engine) ------------------------------

def _wrapper(cls, slot_ids, token_ids, is_prefill=True):
    from vllm.lora.layers import LoRAMapping

    wrapper = cls(64, max_batches=16, device="cpu")
    wrapper.update_metadata(LoRAMapping(token_ids, token_ids, is_prefill=is_prefill), slot_ids,
                            len(slot_ids) + 1, vocab_size=32)
    return wrapper


def _stacked(rng, slots, ranks, rows, cols, zero_slots=()):
    """[slots, 1, rows, cols] weights; slot s is non-zero only in its first ranks[s] rank entries."""
    a = torch.zeros(slots, 1, rows, cols)
    for s, r in enumerate(ranks):
        if s not in zero_slots:
            a[s, 0, :r] = torch.randn(r, cols, generator=rng)
    return a


def _dense_reference(y, x, a_slices, b_slices, sizes, token_slots, scale):
    out = y.clone()
    for t, slot in enumerate(token_slots):
        offset = 0
        for a, b, size in zip(a_slices, b_slices, sizes):
            if slot >= 0:
                out[t, offset:offset + size] += (x[t] @ a[slot, 0].T * scale) @ b[slot, 0].T
            offset += size
    return out


@pytest.fixture(scope="module", params=["scattered", "contiguous"])
def op_case(request):
    rng = torch.Generator().manual_seed(0)
    slot_ids = [11, 12, 13, 14]  # LoRA id held by each of the 4 slots: all in use. Token id 0: no adapter.
    token_ids = {"scattered": [0, 12, 12, 0, 14, 11, 12, 0, 11, 11, 0, 13],  # decode of a mixed batch
                 "contiguous": [0, 0, 12, 12, 12, 0, 14, 11, 11, 0, 0, 13]}[request.param]  # prefills
    token_slots = [slot_ids.index(i) if i else -1 for i in token_ids]
    max_rank, d_in, sizes = 16, 12, (8, 4, 4)
    ranks = (3, 16, 5, 8)
    a = tuple(_stacked(rng, 4, ranks, max_rank, d_in, zero_slots=(2,) if i == 1 else ()) for i in range(3))
    b = tuple(_stacked(rng, 4, ranks, max_rank, size).transpose(2, 3).contiguous() for size in sizes)
    x = torch.randn(len(token_ids), d_in, generator=rng)
    y = torch.randn(len(token_ids), sum(sizes), generator=rng)
    expected = _dense_reference(y, x, a, b, sizes, token_slots, 0.5)
    return dict(name=request.param, slot_ids=slot_ids, token_ids=token_ids, token_slots=token_slots, a=a, b=b, x=x, y=y,
                sizes=sizes, expected=expected)


def test_grouped_wrapper_matches_dense_reference_and_leaves_base_rows_alone(op_case):
    from llm_platform.engine.cpu_lora_wrapper import GroupedPunicaWrapperCPU

    c = op_case
    wrapper = _wrapper(GroupedPunicaWrapperCPU, c["slot_ids"], c["token_ids"])
    # Scattered rows are gathered per layer; contiguous ones are computed in place.
    assert (wrapper._tokens.perm is None) == (c["name"] == "contiguous")
    y = c["y"].clone()
    wrapper.add_lora_linear(y, c["x"], c["a"], c["b"], 0.5, c["sizes"])
    torch.testing.assert_close(y, c["expected"])
    base_rows = [t for t, s in enumerate(c["token_slots"]) if s < 0]
    assert torch.equal(y[base_rows], c["y"][base_rows])
    # The split path (row-parallel layers): shrink into a zeroed buffer, then expand.
    y = c["y"].clone()
    buffer = torch.zeros(3, len(c["token_ids"]), 16)
    wrapper.add_shrink(buffer, c["x"], c["a"], 0.5)
    wrapper.add_expand(y, buffer, c["b"], c["sizes"], offset_start=0, add_input=True)
    torch.testing.assert_close(y, c["expected"])
    # Decode steps use the same grouping.
    wrapper = _wrapper(GroupedPunicaWrapperCPU, c["slot_ids"], c["token_ids"], is_prefill=False)
    y = c["y"].clone()
    wrapper.add_lora_linear(y, c["x"], c["a"], c["b"], 0.5, c["sizes"])
    torch.testing.assert_close(y, c["expected"])


def test_the_reference_catches_vllms_own_cpu_wrapper(op_case):
    """vLLM 0.32's PunicaWrapperCPU adds the last slot's delta to base rows: the check above would fail."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    c = op_case
    y = c["y"].clone()
    _wrapper(PunicaWrapperCPU, c["slot_ids"], c["token_ids"]).add_lora_linear(
        y, c["x"], c["a"], c["b"], 0.5, c["sizes"])
    lora_rows = [t for t, s in enumerate(c["token_slots"]) if s >= 0]
    base_rows = [t for t, s in enumerate(c["token_slots"]) if s < 0]
    torch.testing.assert_close(y[lora_rows], c["expected"][lora_rows])
    last = _dense_reference(c["y"], c["x"], c["a"], c["b"], c["sizes"], [3] * len(c["token_ids"]), 0.5)
    torch.testing.assert_close(y[base_rows], last[base_rows])
    assert not torch.allclose(y[base_rows], c["y"][base_rows])


def test_grouped_wrapper_lm_head_and_embedding_ops():
    from llm_platform.engine.cpu_lora_wrapper import GroupedPunicaWrapperCPU

    rng = torch.Generator().manual_seed(1)
    slot_ids, token_ids = [21, 22], [22, 0, 21, 22, 0]
    slots = [1, -1, 0, 1, -1]
    wrapper = _wrapper(GroupedPunicaWrapperCPU, slot_ids, token_ids)
    a = _stacked(rng, 2, (4, 2), 8, 6)                                  # [2, 1, R, hidden]
    b = _stacked(rng, 2, (4, 2), 8, 10).transpose(2, 3).contiguous()    # [2, 1, vocab, R]
    x, y = torch.randn(5, 6, generator=rng), torch.randn(5, 10, generator=rng)
    expected = _dense_reference(y, x, (a,), (b,), (10,), slots, 2.0)
    got = y.clone()
    wrapper.add_lora_logits(got, x, a, b, 2.0)
    torch.testing.assert_close(got, expected)
    # Embedding: x already holds each row's LoRA-A embedding; only B is applied.
    h = torch.randn(5, 8, generator=rng)
    got = y.clone()
    wrapper.add_lora_embedding(got, h, b)
    want = y.clone()
    for t, s in enumerate(slots):
        if s >= 0:
            want[t] += h[t] @ b[s, 0].T
    torch.testing.assert_close(got, want)
    # A batch with prompt embeddings: vLLM embeds only the token-id rows (fewer than the mapping).
    # Without embedding weights that is a no-op; with them it must fail loudly, not misapply.
    zero_b = torch.zeros_like(b)
    wrapper.add_lora_embedding(got[:3], h[:3], zero_b)
    with pytest.raises(RuntimeError, match="has 3 rows but the LoRA mapping has 5"):
        wrapper.add_lora_embedding(got[:3], h[:3], b)


def test_plugin_is_registered_and_selected_on_cpu():
    from importlib.metadata import entry_points

    from vllm.platforms import current_platform
    from vllm.plugins import load_general_plugins

    from llm_platform.engine import cpu_lora

    assert any(ep.value == "llm_platform.engine.cpu_lora:register" for ep in entry_points(group="vllm.general_plugins"))
    load_general_plugins()
    assert current_platform.get_punica_wrapper() == cpu_lora.WRAPPER
    cpu_lora.register()  # idempotent
    assert current_platform.get_punica_wrapper() == cpu_lora.WRAPPER


def test_plugin_refuses_another_vllm_version(monkeypatch):
    import vllm

    from llm_platform.engine import cpu_lora

    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    with pytest.raises(RuntimeError, match="written for vLLM 0.32.0, found vLLM 0.33.0"):
        cpu_lora.register()


# --- real vLLM against transformers + PEFT ------------------------------------------------------

@pytest.fixture(scope="module")
def mixed_loras(tiny_models, tmp_path_factory):
    """``mixed_loras[size]``: one AdapterRef per LORA_SPECS entry."""
    root = tmp_path_factory.mktemp("mixed-loras")
    return {size: [AdapterRef(name=f"{size}-r{rank}-{len(targets)}{'-pattern' if pattern else ''}", kind="lora",
                              path=str(make_lora(tiny_models[size], root / f"{size}-{i}", seed=100 + i, rank=rank,
                                                 targets=targets, rank_pattern=pattern)))
                   for i, (rank, targets, pattern) in enumerate(LORA_SPECS)]
            for size in TINY_NAMES}


@pytest.mark.slow
@pytest.mark.parametrize("size", TINY_NAMES)
def test_base_loras_and_soft_prompt_batched_together_equal_each_alone_and_peft(
        size, engines, adapters, mixed_loras, loop):
    vllm_engine, reference = engines(size, "vllm"), engines(size, "transformers")
    soft = AdapterRef(name=f"{size}-soft_prompt", kind="soft_prompt", path=str(adapters[size]["soft_prompt"]))
    loras = mixed_loras[size]
    tenants = [None, soft, *loras]

    def ids(engine, prompt, adapter):
        return loop.run(engine.generate(prompt, GREEDY, adapter)).choices[0].token_ids

    alone = {(p, t): ids(vllm_engine, p, t) for p in PROMPTS for t in tenants}
    for (prompt, tenant), got in alone.items():
        assert got == ids(reference, prompt, tenant), (prompt, tenant and tenant.name)
    for prompt in PROMPTS:  # every adapter visibly acts, so a misapplied one cannot go unseen
        assert len({tuple(alone[(prompt, t)]) for t in tenants}) == len(tenants), prompt

    async def together(batch):
        return await asyncio.gather(*(vllm_engine.generate(p, GREEDY, t) for p, t in batch))

    # N = 1 .. 5 LoRA adapters at once beside base and soft-prompt requests: N >= 4 fills every
    # slot (max_loras 4) and N = 5 makes vLLM swap adapters through the slots within one round.
    for n in range(1, len(loras) + 1):
        batch = [(p, t) for p in PROMPTS for t in [None, soft, *loras[:n]]] * 2
        for (prompt, tenant), result in zip(batch, loop.run(together(batch))):
            assert result.choices[0].token_ids == alone[(prompt, tenant)], (n, prompt, tenant and tenant.name)
