"""Slow clients, in one process: acks move a window (a client past it is paused and catches
up from history), a client that does not ack is sent off to resume (4013), and lag is what
the client read."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import override_settings

from streaming_app.manager import StreamingManager, get_streaming_manager
from streaming_app.models import StreamClient
from streaming_app.protocol import CloseCode

from .conftest import Peer, delta, eventually
from .test_sse import listen

pytestmark = pytest.mark.django_db(transaction=True)


async def push(manager: StreamingManager, stream_id: str, first: int, last: int) -> None:
    for i in range(first, last + 1):
        await manager.push_chunk(stream_id, delta(stream_id, str(i)))


async def chunk_seqs(peer: Peer, count: int) -> list[int]:
    frames = [await peer.frame() for _ in range(count)]
    assert all(f["type"] == "chunk" for f in frames), frames
    return [f["seq"] for f in frames]


def follower_of(manager: StreamingManager, stream_id: str) -> Any:
    (follower,) = [f for (sid, _), f in manager.worker.followers.items() if sid == stream_id]
    return follower


@override_settings(STREAMING_APP={"CLIENT_WINDOW_CHUNKS": 5})
async def test_a_client_that_acks_is_paused_at_its_window_and_resumed_by_its_acks(
    connect: Any, session_key: str
) -> None:
    manager = get_streaming_manager()  # after the override
    stream_id = await manager.create_stream(session_key=session_key)
    peer = await connect(stream_id, query="ack=1")
    assert (await peer.frame())["type"] == "subscribed"
    await push(manager, stream_id, 1, 12)
    assert await chunk_seqs(peer, 5) == [1, 2, 3, 4, 5]
    assert await peer.silent()  # the window is full: seq 6 waits in history
    follower = follower_of(manager, stream_id)
    assert follower.paused
    assert await manager.get_client_lags(stream_id) == {follower.client_id: 12}  # none acked
    await peer.send({"type": "ack", "seq": 3})  # room for 3 more
    assert await chunk_seqs(peer, 3) == [6, 7, 8]
    assert await peer.silent()
    assert await manager.get_client_lags(stream_id) == {follower.client_id: 9}
    await manager.close_stream(stream_id, "done")  # the close waits for the acks, too
    assert await peer.silent()
    await peer.send({"type": "ack", "seq": 8})
    assert await chunk_seqs(peer, 4) == [9, 10, 11, 12]
    frames, code = await peer.frames_until_close()
    assert frames == [{"type": "closed", "reason": "done", "last_seq": 12}]
    assert code == CloseCode.STREAM_CLOSED


@override_settings(STREAMING_APP={"CLIENT_WINDOW_BYTES": 1300})
async def test_the_window_also_counts_bytes(connect: Any, session_key: str) -> None:
    manager = get_streaming_manager()  # after the override
    stream_id = await manager.create_stream(session_key=session_key)
    peer = await connect(stream_id, query="ack=1")
    await peer.frame()
    for _ in range(6):  # each chunk frame is about 410 bytes
        await manager.push_chunk(stream_id, delta(stream_id, "x" * 200))
    assert await chunk_seqs(peer, 3) == [1, 2, 3]
    assert await peer.silent()
    await peer.send({"type": "ack", "seq": 3})
    assert await chunk_seqs(peer, 3) == [4, 5, 6]


@override_settings(STREAMING_APP={"CLIENT_MAX_UNREAD_BYTES": 1300})
async def test_a_client_that_does_not_ack_is_sent_off_and_resumes_exactly_once(
    connect: Any, session_key: str
) -> None:
    manager = get_streaming_manager()  # after the override
    stream_id = await manager.create_stream(session_key=session_key)
    peer = await connect(stream_id)
    await peer.frame()
    for _ in range(6):
        await manager.push_chunk(stream_id, delta(stream_id, "x" * 200))
    frames, code = await peer.frames_until_close()
    assert [f["seq"] for f in frames if f["type"] == "chunk"] == [1, 2, 3]
    assert frames[-1]["type"] == "reconnect" and frames[-1]["last_seq"] == 3, frames[-1]
    assert "too far behind" in frames[-1]["reason"]
    assert code == CloseCode.TOO_FAR_BEHIND
    assert await manager.get_client_count_for_stream(stream_id) == 0  # released
    again = await connect(stream_id, query="last_seq=3")
    assert (await again.frame())["type"] == "subscribed"
    assert await chunk_seqs(again, 3) == [4, 5, 6]
    # An ack is the sign of reading: a client that acks as it reads is never sent off.
    await again.send({"type": "ack", "seq": 6})
    await eventually(lambda: follower_of(manager, stream_id).acked_seq == 6)  # it was read
    await push(manager, stream_id, 7, 9)
    assert await chunk_seqs(again, 3) == [7, 8, 9]


@override_settings(STREAMING_APP={"CLIENT_MAX_UNREAD_BYTES": 1300})
async def test_an_sse_response_ends_with_reconnect_and_last_event_id_resumes(
    session_key: str,
) -> None:
    manager = get_streaming_manager()  # after the override
    stream_id = await manager.create_stream(session_key=session_key)
    for _ in range(6):
        await manager.push_chunk(stream_id, delta(stream_id, "x" * 200))
    listener = await listen(stream_id, session_key)
    events = await listener.read_until("reconnect")
    assert [e["id"] for e in events if e["event"] == "chunk"] == ["1", "2", "3"]
    assert events[-1]["data"]["last_seq"] == 3
    again = await listen(stream_id, session_key, headers=[(b"last-event-id", b"3")])
    await manager.close_stream(stream_id, "done")
    events = await again.read_until("closed")
    assert [e["id"] for e in events if e["event"] == "chunk"] == ["4", "5", "6"]


@override_settings(STREAMING_APP={"CLIENT_WINDOW_CHUNKS": 2, "CLIENT_TIMEOUT_SECONDS": 0.3,
                                  "SWEEP_INTERVAL_SECONDS": 0.1})  # fmt: skip
async def test_a_paused_client_that_stops_acking_is_sent_off_after_the_client_timeout(
    connect: Any, session_key: str
) -> None:
    manager = get_streaming_manager()  # after the override
    stream_id = await manager.create_stream(session_key=session_key)
    peer = await connect(stream_id, query="ack=1")
    await peer.frame()
    await push(manager, stream_id, 1, 4)
    assert await chunk_seqs(peer, 2) == [1, 2]
    await manager.worker.nudge_stragglers()  # stalled, but paused for less than the timeout
    await manager.worker.nudge_stragglers()
    assert await peer.silent()
    follower = follower_of(manager, stream_id)
    follower.paused_since -= 1  # as if a second went by without an ack
    await manager.worker.nudge_stragglers()
    frames, code = await peer.frames_until_close()
    assert frames[-1]["type"] == "reconnect" and frames[-1]["last_seq"] == 2, frames
    assert "no ack" in frames[-1]["reason"]
    assert code == CloseCode.TOO_FAR_BEHIND


async def test_bad_acks_are_refused_with_an_error_frame(
    manager: StreamingManager, connect: Any, session_key: str
) -> None:
    stream_id = await manager.create_stream(session_key=session_key)
    peer = await connect(stream_id)
    await peer.frame()
    await push(manager, stream_id, 1, 2)
    await chunk_seqs(peer, 2)
    for ack in ({"type": "ack", "seq": 3}, {"type": "ack", "seq": "2"}, {"type": "ack"},
                {"type": "ack", "seq": True}):  # fmt: skip
        await peer.send(ack)
        answer = await peer.frame()
        assert answer["type"] == "error" and answer["code"] == "bad_frame", (ack, answer)
    await peer.send({"type": "ack", "seq": 2})
    assert await peer.silent()


async def test_ack_in_the_query_must_be_1_or_0(
    manager: StreamingManager, connect: Any, session_key: str
) -> None:
    stream_id = await manager.create_stream(session_key=session_key)
    peer = await connect(stream_id, query="ack=yes")
    frames, code = await peer.frames_until_close()
    assert frames[0]["code"] == "INVALID_ARGUMENT" and "ack must be 1 or 0" in frames[0]["message"]
    assert code == CloseCode.BAD_REQUEST


@override_settings(STREAMING_APP={"CLIENT_WINDOW_CHUNKS": 3})
async def test_a_client_that_acks_reads_a_closed_stream_to_its_end(
    connect: Any, session_key: str
) -> None:
    manager = get_streaming_manager()  # after the override
    stream_id = await manager.create_stream(session_key=session_key)
    await push(manager, stream_id, 1, 7)
    await manager.close_stream(stream_id, "done")
    peer = await connect(stream_id, query="ack=1&last_seq=1")
    assert await chunk_seqs(peer, 3) == [2, 3, 4]
    assert await peer.silent()
    await peer.send({"type": "ack", "seq": 4})
    assert await chunk_seqs(peer, 3) == [5, 6, 7]
    await peer.send({"type": "ack", "seq": 7})
    frames, code = await peer.frames_until_close()
    assert frames == [{"type": "closed", "reason": "done", "last_seq": 7}]
    assert code == CloseCode.STREAM_GONE


async def test_a_client_row_starts_with_its_position_so_the_next_heartbeat_writes_none(
    connect: Any, session_key: str
) -> None:
    """A client that resumes at seq 3 and acks: its row says so from its registration, and
    the worker's next heartbeat has no position to write (a connect storm is not followed by
    an UPDATE of every new row)."""
    manager = get_streaming_manager()
    stream_id = await manager.create_stream(session_key=session_key)
    await push(manager, stream_id, 1, 3)
    peer = await connect(stream_id, query="ack=1&last_seq=3")
    assert (await peer.frame())["type"] == "subscribed"
    follower = follower_of(manager, stream_id)
    row = await StreamClient.objects.aget(client_id=follower.client_id)
    assert (row.delivered_seq, row.acked_seq, row.paused) == (3, 3, False) == follower.position
    saved = manager.worker._saved_positions
    assert saved[(stream_id, follower.client_id)] == follower.position  # nothing moved
