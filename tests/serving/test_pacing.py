"""Pacing of streamed pieces into messages (llm_platform.serving.pacing), on real asyncio generators.

Margins are wide (an interval of seconds against "at once" in well under one) so that a loaded 2-core
machine cannot fail them; the end-to-end streaming is in test_http_api.py."""

from __future__ import annotations

import asyncio
import time

import pytest

from llm_platform.serving.pacing import MAX_INTERVAL_S, StreamPacer, paced


async def timed(gaps: list[float], log: list[str] | None = None, fail_after: int | None = None):
    """Pieces 0, 1, ... each after its gap; records its own clean-up in ``log``."""
    try:
        for i, gap in enumerate(gaps):
            await asyncio.sleep(gap)
            if fail_after is not None and i == fail_after:
                raise ValueError("the engine failed")
            yield (i, time.monotonic())
    finally:
        if log is not None:
            log.append("closed")


async def collect(batches) -> list[tuple[float, list]]:
    return [(time.monotonic(), batch) async for batch in batches]


def test_sparse_pieces_go_at_once_and_dense_ones_at_most_once_per_interval():
    # Pieces 1.2 s apart with a 0.4 s interval: each goes alone, right away.
    sparse = asyncio.run(collect(paced(timed([0, 1.2, 1.2]), lambda: 0.4)))
    assert [[i for i, _ in batch] for _, batch in sparse] == [[0], [1], [2]]
    assert all(sent - batch[0][1] < 0.3 for sent, batch in sparse)

    # 30 pieces 0.05 s apart with a 0.4 s interval: the first at once, then one message per interval (the
    # last goes when the source ends), every piece once and in order.
    dense = asyncio.run(collect(paced(timed([0] + [0.05] * 29), lambda: 0.4)))
    assert [i for _, batch in dense for i, _ in batch] == list(range(30))
    assert [i for i, _ in dense[0][1]] == [0] and dense[0][0] - dense[0][1][0][1] < 0.3
    sent = [t for t, _ in dense]
    assert all(b - a >= 0.38 for a, b in zip(sent, sent[1:-1])), sent
    made = dense[-1][1][-1][1] - dense[0][1][0][1]  # 1.45 s, longer on a loaded machine
    assert len(dense) <= 2 + made / 0.4  # the first, one per full interval, and the end


def test_the_last_pieces_go_when_the_source_ends_not_after_the_interval():
    start = time.monotonic()
    batches = asyncio.run(collect(paced(timed([0, 0.01, 0.01]), lambda: 30.0)))
    assert [[i for i, _ in batch] for _, batch in batches] == [[0], [1, 2]]
    assert time.monotonic() - start < 5


def test_an_error_comes_after_the_pieces_before_it():
    received = []

    async def run():
        async for batch in paced(timed([0, 0.01, 0.01, 0.01], fail_after=2), lambda: 0.2):
            received.extend(i for i, _ in batch)

    with pytest.raises(ValueError, match="the engine failed"):
        asyncio.run(run())
    assert received == [0, 1]


def test_leaving_early_closes_the_source_and_reads_no_further():
    log, read = [], []

    async def source():
        async for piece in timed([0] + [0.01] * 1000, log):
            read.append(piece[0])
            yield piece

    async def run():
        batches = paced(source(), lambda: 0.05)
        first = await anext(batches)
        await batches.aclose()  # as Serve closes the replica's generator when the client left
        count = len(read)
        await asyncio.sleep(0.3)
        return first, count

    first, count = asyncio.run(run())
    assert [i for i, _ in first] == [0]
    assert log == ["closed"] and len(read) == count < 1000


def test_the_pacer_widens_the_interval_with_open_streams():
    pacer = StreamPacer(min_interval_ms=50, messages_per_s=200)
    assert pacer.interval_s() == 0.05
    pacer.open = 32
    assert pacer.interval_s() == pytest.approx(0.16)
    pacer.open = 10_000
    assert pacer.interval_s() == MAX_INTERVAL_S
    assert StreamPacer(min_interval_ms=50, messages_per_s=0).interval_s() == 0.05

    async def run():
        pacer = StreamPacer(min_interval_ms=10, messages_per_s=200)
        seen = []
        streams = [pacer.stream(timed([0, 0.05, 0.05])) for _ in range(3)]
        firsts = [await anext(s) for s in streams]
        seen.append(pacer.open)
        for s in streams:
            async for _ in s:
                pass
        seen.append(pacer.open)
        return firsts, seen

    firsts, seen = asyncio.run(run())
    assert seen == [3, 0] and all(len(f) == 1 for f in firsts)
