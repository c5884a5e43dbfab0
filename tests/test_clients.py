"""Delivery: each seq once, in order; holes filled from history; lost ranges as gaps."""

from __future__ import annotations

import json
from typing import Any

from streaming_app.clients import Chunk, Delivery, Follower, Gap
from streaming_app.history import MemoryHistory
from streaming_app.protocol import ServerFrame


async def filled(count: int, max_chunks: int = 100) -> MemoryHistory:
    history = MemoryHistory(max_chunks=max_chunks, max_age_seconds=3600)
    await history.open("s")
    for i in range(1, count + 1):
        await history.append("s", str(i), take_failures=False)
    return history


class Recorder(Follower):
    """A follower whose transport records the frames written."""

    transport = "python"

    def __init__(self, history: MemoryHistory, delivered_seq: int = 0) -> None:
        self.scope, self.stream_id, self.client_id = {}, "s", "c"
        self.delivery = Delivery(history, "s", delivered_seq)
        self.written_seq = delivered_seq
        self.frames: list[dict[str, Any]] = []

    async def write(self, kind: ServerFrame, text: str, seq: int | None) -> None:
        self.frames.append(json.loads(text))

    def seqs(self) -> list[int]:
        return [f["seq"] for f in self.frames]


def event(seq: int) -> dict[str, Any]:
    return {"type": "stream.chunk", "seq": seq, "chunk": str(seq)}


async def test_in_order_chunks_pass_and_duplicates_drop() -> None:
    follower = Recorder(await filled(3))
    for seq in (1, 1, 2):
        await follower.dispatch_event(event(seq))
    assert follower.frames == [{"type": "chunk", "seq": 1, "chunk": 1},
                               {"type": "chunk", "seq": 2, "chunk": 2}]  # fmt: skip


async def test_a_hole_is_filled_from_history() -> None:
    follower = Recorder(await filled(6), delivered_seq=1)
    for seq in (5, 4, 6):
        await follower.dispatch_event(event(seq))
    assert follower.seqs() == [2, 3, 4, 5, 6]
    assert follower.delivered_seq == 6


async def test_what_history_lost_comes_out_as_a_gap() -> None:
    delivery = Delivery(await filled(10, max_chunks=3), "s", delivered_seq=2)
    assert await delivery.catch_up() == [Gap(3, 7), Chunk(8, "8"), Chunk(9, "9"), Chunk(10, "10")]
    assert await delivery.catch_up() == []


async def test_catch_up_stops_at_up_to() -> None:
    delivery = Delivery(await filled(5), "s")
    assert await delivery.catch_up(2) == [Chunk(1, "1"), Chunk(2, "2")]
    assert await delivery.catch_up(5) == [Chunk(3, "3"), Chunk(4, "4"), Chunk(5, "5")]
