"""Streamed pieces grouped into messages, at most one message per interval.

Every message a replica sends for a stream crosses two Ray hops (replica → ingress → proxy), and each
hop costs the three processes CPU that on a small node is taken from the engine: at 32 streams on 2
cores, one message per token cost the platform a fifth of its streamed throughput (measured, see
README). Ray Serve LLM's ``Batcher`` (``ray.llm._internal``) sends what a fixed timer collected; it
wakes every interval even with nothing to send, a lone piece waits for the timer, and its interval does
not grow with the load. :func:`paced` instead sends a piece at once when the stream's last message left
at least an interval ago (a sparse stream pays no delay), and otherwise sends everything ready one
interval after that last message; :class:`StreamPacer` makes the interval grow with the replica's open
streams so that their messages stay within a budget per second.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import TypeVar

T = TypeVar("T")
_END = object()

MAX_INTERVAL_S = 1.0
"""However many streams share a replica, each still gets a message at least this often (when it has pieces)."""


async def paced(pieces: AsyncGenerator[T, None], interval_s: Callable[[], float]) -> AsyncIterator[list[T]]:
    """``pieces`` in lists, in order: a piece goes at once when the last list left ``interval_s()`` ago or
    more; otherwise it waits until then and goes with every piece ready by that time. The last pieces go
    as soon as ``pieces`` ends. Closing this generator cancels the read of ``pieces`` and closes it (a
    generation stops when its client leaves); an error in ``pieces`` is raised here after the pieces
    before it."""
    queue: asyncio.Queue = asyncio.Queue()
    ended = asyncio.get_running_loop().create_future()

    async def read():
        try:
            async for piece in pieces:
                queue.put_nowait(piece)
        finally:
            queue.put_nowait(_END)
            if not ended.done():
                ended.set_result(None)

    reader = asyncio.create_task(read())
    last_sent = -math.inf
    try:
        while True:
            batch = [await queue.get()]
            wait = last_sent + interval_s() - time.monotonic()
            if wait > 0 and batch[0] is not _END:
                await asyncio.wait({ended}, timeout=wait)
            while not queue.empty():
                batch.append(queue.get_nowait())
            done = batch[-1] is _END
            if done:
                batch.pop()
            if batch:
                last_sent = time.monotonic()
                yield batch
            if done:
                reader.result()  # the error that ended ``pieces``, if any
                return
    finally:
        if not reader.done():
            reader.cancel()
        with contextlib.suppress(BaseException):  # its error, if any, was raised above or is moot now
            await reader
        # The reader's async-for left ``pieces`` suspended when cancelled: close it, running its cleanup.
        await pieces.aclose()


class StreamPacer:
    """Intervals for a replica's streams: each stream's messages at most every ``min_interval_ms``, and all of
    them together within ``messages_per_s`` (a stream's interval grows to streams / messages_per_s, up to
    :data:`MAX_INTERVAL_S`). ``messages_per_s`` 0: no budget, the fixed interval only."""

    def __init__(self, min_interval_ms: float, messages_per_s: float):
        self.min_interval_s = min_interval_ms / 1000
        self.messages_per_s = messages_per_s
        self.open = 0
        """Streams this replica is sending now."""

    def interval_s(self) -> float:
        if not self.messages_per_s:
            return self.min_interval_s
        return max(self.min_interval_s, min(MAX_INTERVAL_S, self.open / self.messages_per_s))

    async def stream(self, pieces: AsyncGenerator[T, None]) -> AsyncIterator[list[T]]:
        """:func:`paced` ``pieces``, counted among the open streams while they last."""
        self.open += 1
        batches = paced(pieces, self.interval_s)
        try:
            async for batch in batches:
                yield batch
        finally:
            self.open -= 1
            await batches.aclose()
