import asyncio

from llm_platform.engine.gate import KindGate, PrefillAloneGate


def test_kinds_exclude_each_other_and_take_turns():
    async def scenario():
        gate, log = KindGate(), []

        async def request(kind, name, hold):
            await gate.acquire(kind)
            log.append(("in", name))
            await asyncio.sleep(hold)
            log.append(("out", name))
            await gate.release(kind)

        first = asyncio.create_task(request("lora", "lora1", 0.05))
        await asyncio.sleep(0.01)
        soft = asyncio.create_task(request("soft_prompt", "soft1", 0.02))
        await asyncio.sleep(0.01)
        # Arrives while a soft prompt waits: must not overtake it.
        late = asyncio.create_task(request("lora", "lora2", 0.01))
        await asyncio.gather(first, soft, late)
        return log

    log = asyncio.run(scenario())
    assert log == [("in", "lora1"), ("out", "lora1"), ("in", "soft1"), ("out", "soft1"), ("in", "lora2"),
                   ("out", "lora2")]


def test_same_kind_shares_the_gate():
    async def scenario():
        gate = KindGate()
        for _ in range(5):
            await asyncio.wait_for(gate.acquire("lora"), 1)
        return gate

    asyncio.run(scenario())


def test_cancelled_waiter_does_not_block_others():
    async def scenario():
        gate = KindGate()
        await gate.acquire("lora")
        waiter = asyncio.create_task(gate.acquire("soft_prompt"))
        await asyncio.sleep(0.01)
        waiter.cancel()
        await asyncio.sleep(0.01)
        await asyncio.wait_for(gate.acquire("lora"), 1)

    asyncio.run(scenario())


def test_prompt_logprobs_prefill_runs_alone_then_shares():
    async def scenario():
        gate, log = PrefillAloneGate(), []

        async def request(name, alone, prefill, decode):
            await gate.acquire(alone)
            log.append(("in", name))
            await asyncio.sleep(prefill)
            if alone:
                log.append(("prefilled", name))
                await gate.prefilled()
            await asyncio.sleep(decode)
            log.append(("out", name))
            await gate.release()

        plain = asyncio.create_task(request("plain1", False, 0.0, 0.05))
        await asyncio.sleep(0.01)
        echo = asyncio.create_task(request("echo", True, 0.03, 0.05))
        await asyncio.sleep(0.01)
        late = asyncio.create_task(request("plain2", False, 0.0, 0.01))  # must wait for echo's prefill
        await asyncio.gather(plain, echo, late)
        return log

    log = asyncio.run(scenario())
    assert log[:4] == [("in", "plain1"), ("out", "plain1"), ("in", "echo"), ("prefilled", "echo")]
    assert log[4] == ("in", "plain2")  # joins while echo decodes
    assert set(log[5:]) == {("out", "echo"), ("out", "plain2")}
