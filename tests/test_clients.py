"""Delivery: each seq once, in order; holes filled from history; lost ranges as gaps."""

from __future__ import annotations

from streaming_app.clients import Chunk, Delivery, Gap
from streaming_app.history import MemoryHistory


async def filled(count: int, max_chunks: int = 100) -> MemoryHistory:
    history = MemoryHistory(max_chunks=max_chunks, max_age_seconds=3600)
    await history.open("s")
    for i in range(1, count + 1):
        await history.append("s", str(i), take_failures=False)
    return history


async def test_in_order_chunks_pass_and_duplicates_drop() -> None:
    delivery = Delivery(await filled(3), "s")
    assert await delivery.receive(1, "1") == [Chunk(1, "1")]
    assert await delivery.receive(1, "1") == []
    assert await delivery.receive(2, "2") == [Chunk(2, "2")]


async def test_a_hole_is_filled_from_history() -> None:
    delivery = Delivery(await filled(6), "s", delivered_seq=1)
    items = await delivery.receive(5, "5")
    assert items == [Chunk(2, "2"), Chunk(3, "3"), Chunk(4, "4"), Chunk(5, "5")]
    assert await delivery.receive(4, "4") == []
    assert delivery.delivered_seq == 5


async def test_what_history_lost_comes_out_as_a_gap() -> None:
    delivery = Delivery(await filled(10, max_chunks=3), "s", delivered_seq=2)
    assert await delivery.catch_up() == [Gap(3, 7), Chunk(8, "8"), Chunk(9, "9"), Chunk(10, "10")]
    assert await delivery.catch_up() == []


async def test_catch_up_stops_at_up_to() -> None:
    delivery = Delivery(await filled(5), "s")
    assert await delivery.catch_up(2) == [Chunk(1, "1"), Chunk(2, "2")]
    assert await delivery.receive(5, "5") == [Chunk(3, "3"), Chunk(4, "4"), Chunk(5, "5")]
