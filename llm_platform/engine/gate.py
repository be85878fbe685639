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
