"""Keeps LoRA requests and soft-prompt prefills out of the same vLLM batch.

vLLM 0.32 fails a whole step (and kills its engine core) when one batch holds
prompt-embedding prefill tokens next to tokens of an active LoRA: its LoRA
embedding layer is then run on a subset of the batch with the full batch's
adapter mapping. Base-model requests mix safely with either. So a soft-prompt
request holds the gate only until its prefill is done (its first output), a LoRA
request for its whole life, and a waiting request of the other kind stops new
arrivals from overtaking it, so neither kind starves.
"""

from __future__ import annotations

import asyncio
from collections import Counter


class KindGate:
    def __init__(self):
        self._cond = asyncio.Condition()
        self._active: Counter[str] = Counter()
        self._waiting: Counter[str] = Counter()
        self._turn: str | None = None  # whose waiters go first when both kinds wait

    async def acquire(self, kind: str) -> None:
        other = _other(kind)
        async with self._cond:
            self._waiting[kind] += 1
            try:
                await self._cond.wait_for(
                    lambda: not self._active[other] and (not self._waiting[other] or self._turn == kind))
            except BaseException:
                self._cond.notify_all()
                raise
            finally:
                self._waiting[kind] -= 1
            self._active[kind] += 1

    async def release(self, kind: str) -> None:
        async with self._cond:
            self._active[kind] -= 1
            if not self._active[kind]:
                self._turn = _other(kind)
            self._cond.notify_all()


def _other(kind: str) -> str:
    return "soft_prompt" if kind == "lora" else "lora"


class PrefillAloneGate:
    """Lets a request that asks for prompt log-probabilities prefill alone in vLLM's batch.

    vLLM 0.32 on CPU with LoRA enabled computes prompt logits through its LoRA logits
    processor with one adapter index per *request* of the batch (``PunicaWrapperCPU.add_lora_logits``
    uses ``sampler_indices``), so a prompt-logprobs prefill batched with any other request
    fails the whole engine step (einsum shape error) and kills the engine core. Alone in the
    batch the single index broadcasts over the prompt's tokens and the result is right. So
    such a request waits until no other request is in flight, holds new ones back until its
    prefill is done (its first output), then counts as an ordinary request.
    """

    def __init__(self):
        self._cond = asyncio.Condition()
        self._active = 0
        self._alone = False
        self._waiting_alone = 0

    async def acquire(self, alone: bool) -> None:
        async with self._cond:
            if alone:
                self._waiting_alone += 1
                try:
                    await self._cond.wait_for(lambda: not self._active and not self._alone)
                except BaseException:
                    self._cond.notify_all()
                    raise
                finally:
                    self._waiting_alone -= 1
                self._alone = True
            else:
                await self._cond.wait_for(lambda: not self._alone and not self._waiting_alone)
            self._active += 1

    async def prefilled(self) -> None:
        """The alone request's prefill is done: others may join its batch again."""
        async with self._cond:
            self._alone = False
            self._cond.notify_all()

    async def release(self, alone_still: bool = False) -> None:
        async with self._cond:
            self._active -= 1
            if alone_still:
                self._alone = False
            self._cond.notify_all()
