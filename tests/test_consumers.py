"""The WebSocket consumer, through Channels' WebsocketCommunicator."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.routing import URLRouter
from django.contrib.auth.models import Permission, User
from django.contrib.sessions.backends.db import SessionStore
from django.test import override_settings

from streaming_app.chunks import encode_chunk
from streaming_app.exceptions import GMIErrorCode, StreamError
from streaming_app.manager import StreamingManager, get_streaming_manager
from streaming_app.models import StreamClient as StreamClientRow
from streaming_app.protocol import CloseCode
from streaming_app.routing import websocket_urlpatterns

from .conftest import Peer, delta, eventually

pytestmark = pytest.mark.django_db(transaction=True)

application = URLRouter(websocket_urlpatterns)


@pytest.fixture
def slow_consumer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the consumer slower than the producer, so its channel really overflows. It reads
    a channel of its own, as a WebSocket client on the core Redis layer and every other
    transport do (with a hub there is no such channel: see ``test_fanout.py``)."""
    from streaming_app.consumers import StreamConsumer

    monkeypatch.setattr(StreamConsumer, "uses_hub", False)
    original = StreamConsumer.send

    async def slow_send(self: StreamConsumer, *args: Any, **kwargs: Any) -> None:
        await asyncio.sleep(0.02)
        await original(self, *args, **kwargs)

    monkeypatch.setattr(StreamConsumer, "send", slow_send)


async def following(manager: StreamingManager, connect: Any, session_key: str) -> tuple[str, Peer]:
    """A new stream and a peer that has received its first chunk, "1"."""
    stream_id = await manager.create_stream(session_key=session_key)
    peer = await connect(stream_id)
    await peer.frame()
    await manager.push_chunk(stream_id, delta(stream_id, "1"))
    assert texts([await peer.frame()]) == ["1"]
    return stream_id, peer


def texts(frames: list[dict[str, Any]]) -> list[str]:
    return [f["chunk"]["text_delta"] for f in frames if f["type"] == "chunk"]


async def test_subscribe_receive_live_chunks_then_close(
    manager: StreamingManager, connect: Any, session_key: str
) -> None:
    stream_id = await manager.create_stream(session_key=session_key)
    peer = await connect(stream_id)
    subscribed = await peer.frame()
    assert subscribed["type"] == "subscribed"
    assert subscribed["seq"] == 0
    assert await manager.get_client_count_for_stream(stream_id) == 1
    for text in ("Hel", "lo"):
        await manager.push_chunk(stream_id, delta(stream_id, text))
    await manager.close_stream(stream_id, "done")
    frames, code = await peer.frames_until_close()
    assert [f.get("seq") for f in frames] == [1, 2, None]
    assert texts(frames) == ["Hel", "lo"]
    assert frames[-1] == {"type": "closed", "reason": "done", "last_seq": 2}
    assert code == CloseCode.STREAM_CLOSED


async def test_resume_from_last_seq_then_live(
    manager: StreamingManager, connect: Any, session_key: str
) -> None:
    stream_id = await manager.create_stream(session_key=session_key)
    for i in range(1, 6):
        await manager.push_chunk(stream_id, delta(stream_id, str(i)))
    peer = await connect(stream_id, query="last_seq=3")
    assert (await peer.frame())["seq"] == 5
    assert [(await peer.frame())["seq"] for _ in range(2)] == [4, 5]
    await manager.push_chunk(stream_id, delta(stream_id, "6"))
    assert texts([await peer.frame()]) == ["6"]
    assert await peer.silent()


async def test_a_client_without_last_seq_gets_the_whole_stream(
    manager: StreamingManager, connect: Any, session_key: str
) -> None:
    stream_id = await manager.create_stream(session_key=session_key)
    for i in range(3):
        await manager.push_chunk(stream_id, delta(stream_id, str(i)))
    peer = await connect(stream_id)
    frames = [await peer.frame() for _ in range(4)]
    assert texts(frames) == ["0", "1", "2"]


@override_settings(STREAMING_APP={"HISTORY_MAX_CHUNKS": 3})
async def test_gap_frame_when_history_no_longer_holds_the_missed_range(
    connect: Any, session_key: str
) -> None:
    manager = get_streaming_manager()  # after the override
    stream_id = await manager.create_stream(session_key=session_key)
    for i in range(1, 11):
        await manager.push_chunk(stream_id, delta(stream_id, str(i)))
    peer = await connect(stream_id, query="last_seq=2")
    frames = [await peer.frame() for _ in range(5)]
    assert frames[1] == {"type": "gap", "from_seq": 3, "to_seq": 7}
    assert [f["seq"] for f in frames[2:]] == [8, 9, 10]


@override_settings(
    CHANNEL_LAYERS={"default": {"BACKEND": "channels.layers.InMemoryChannelLayer",
                                "CONFIG": {"capacity": 5}}}
)  # fmt: skip
async def test_overflowing_channel_is_repaired_from_history(
    connect: Any, session_key: str, slow_consumer: None, caplog: pytest.LogCaptureFixture
) -> None:
    manager = get_streaming_manager()  # after the override
    stream_id = await manager.create_stream(session_key=session_key)
    peer = await connect(stream_id)
    await peer.frame()
    for i in range(1, 61):  # faster than the consumer: its channel overflows
        await manager.push_chunk(stream_id, delta(stream_id, str(i)))
    frames = []
    while not await peer.silent():
        frames.append(await peer.frame())
    assert len(frames) < 60  # the rest was dropped by the channel layer
    await manager.push_chunk(stream_id, delta(stream_id, "61"))  # shows the hole
    frames += [await peer.frame() for _ in range(61 - len(frames))]
    assert texts(frames) == [str(i) for i in range(1, 62)]
    assert any("catch-up" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("case", "code", "error"),
    [
        ("unknown", CloseCode.NOT_FOUND, "RESOURCE_NOT_FOUND"),
        ("forbidden", CloseCode.NOT_FOUND, "RESOURCE_NOT_FOUND"),  # ids cannot be probed
        ("full", CloseCode.STREAM_FULL, "RATE_LIMIT_EXCEEDED"),
        ("bad_last_seq", CloseCode.BAD_REQUEST, "INVALID_ARGUMENT"),
        ("last_seq_past_bigint", CloseCode.BAD_REQUEST, "INVALID_ARGUMENT"),
    ],
)
@override_settings(STREAMING_APP={"MAX_CLIENTS_PER_STREAM": 1})
async def test_refusals_have_their_own_close_codes(
    connect: Any, session_key: str, case: str, code: int, error: str
) -> None:
    manager = get_streaming_manager()  # after the override
    stream_id = await manager.create_stream(session_key=session_key)
    query, session = "", session_key
    if case == "unknown":
        stream_id = "no-such-stream"
    elif case == "closed":
        await manager.close_stream(stream_id, "over")
    elif case == "forbidden":
        other = SessionStore()
        await sync_to_async(other.create)()
        session = other.session_key or ""
    elif case == "full":
        await (await connect(stream_id)).frame()
    elif case == "bad_last_seq":
        query = "last_seq=-4"
    elif case == "last_seq_past_bigint":  # stored as a signed 64-bit integer
        query = "last_seq=9223372036854775808"
    peer = await connect(stream_id, query=query, session=session)
    frames, close_code = await peer.frames_until_close()
    assert close_code == code
    assert [f["code"] for f in frames] == [error]
    expected = 1 if case == "full" else 0  # a refused client leaves no row behind
    if case != "unknown":
        assert await manager.get_client_count_for_stream(stream_id) == expected


async def with_permissions(username: str, *codenames: str, **fields: Any) -> User:
    user = await User.objects.acreate(username=username, **fields)
    async for permission in Permission.objects.filter(codename__in=codenames):
        await user.user_permissions.aadd(permission)
    return user


async def test_owners_and_readers_with_the_permission_may_subscribe_not_staff_alone(
    manager: StreamingManager, connect: Any
) -> None:
    owner = await User.objects.acreate(username="owner")
    reader = await with_permissions("reader", "view_stream_contents", is_staff=True)
    staff = await User.objects.acreate(username="staff", is_staff=True)
    other = await User.objects.acreate(username="other")
    stream_id = await manager.create_stream(owner=owner)
    for user in (owner, reader):
        assert (await (await connect(stream_id, user=user)).frame())["type"] == "subscribed"
    unknown = await (await connect("no-such-stream", user=other)).frames_until_close()
    for user in (staff, other):  # told exactly what a stream that does not exist says
        frames, code = await (await connect(stream_id, user=user)).frames_until_close()
        assert code == CloseCode.NOT_FOUND
        assert frames == [{**unknown[0][0], "message": f"stream {stream_id!r} does not exist"}]


async def test_only_the_owner_and_users_who_may_close_streams_may_cancel(
    manager: StreamingManager, connect: Any
) -> None:
    owner = await User.objects.acreate(username="owner")
    reader = await with_permissions("reader", "view_stream_contents", is_staff=True)
    operator = await with_permissions("operator", "view_stream_contents", "close_stream",
                                      is_staff=True)  # fmt: skip
    stream_id = await manager.create_stream(owner=owner)
    peer = await connect(stream_id, user=reader)  # may read every conversation, not stop it
    await peer.frame()
    await peer.send({"type": "cancel"})
    assert (await peer.frame())["code"] == "PERMISSION_DENIED"
    assert await manager.get_active_stream_ids() == [stream_id]
    peer = await connect(stream_id, user=operator)
    await peer.frame()
    await peer.send({"type": "cancel"})
    frames, code = await peer.frames_until_close()
    assert (frames[-1]["reason"], code) == ("cancelled", CloseCode.STREAM_CLOSED)
    mine = await manager.create_stream(owner=owner)
    peer = await connect(mine, user=owner)
    await peer.frame()
    await peer.send({"type": "cancel"})
    frames, code = await peer.frames_until_close()
    assert (frames[-1]["reason"], code) == ("cancelled", CloseCode.STREAM_CLOSED)


async def test_malformed_frames_get_an_error_and_the_socket_stays(
    manager: StreamingManager, connect: Any, session_key: str
) -> None:
    stream_id = await manager.create_stream(session_key=session_key)
    peer = await connect(stream_id)
    await peer.frame()
    nested = "[" * 2000 + "]" * 2000  # 4 KB that the JSON parser cannot take (RecursionError)
    for bad in ("not json", "[1, 2]", {"type": "dance"}, nested):
        await peer.send(bad)
        assert (await peer.frame())["code"] == "bad_frame"
    await peer.send({"type": "ping"})
    assert await peer.frame() == {"type": "pong"}
    await manager.push_chunk(stream_id, delta(stream_id, "still here"))
    assert texts([await peer.frame()]) == ["still here"]


async def test_oversized_frame_closes_with_4413(
    manager: StreamingManager, connect: Any, session_key: str
) -> None:
    stream_id = await manager.create_stream(session_key=session_key)
    peer = await connect(stream_id)
    await peer.frame()
    await peer.send({"type": "ping", "pad": "x" * 5000})
    frames, code = await peer.frames_until_close()
    assert code == CloseCode.MESSAGE_TOO_BIG
    assert frames[0]["code"] == "frame_too_big"
    assert await manager.get_client_count_for_stream(stream_id) == 0


async def test_cancel_closes_the_stream_for_everyone(
    manager: StreamingManager, connect: Any, session_key: str
) -> None:
    stream_id = await manager.create_stream(session_key=session_key)
    canceller, watcher = await connect(stream_id), await connect(stream_id)
    await canceller.frame()
    await watcher.frame()
    await canceller.send({"type": "cancel"})
    for peer in (canceller, watcher):
        frames, code = await peer.frames_until_close()
        assert frames[-1]["reason"] == "cancelled"
        assert code == CloseCode.STREAM_CLOSED
    assert await manager.get_active_stream_ids() == []


@override_settings(STREAMING_APP={"CAN_CANCEL": "tests.test_consumers.nobody"})
async def test_cancel_needs_the_cancel_rule(connect: Any, session_key: str) -> None:
    manager = get_streaming_manager()  # after the override
    stream_id = await manager.create_stream(session_key=session_key)
    peer = await connect(stream_id)
    await peer.frame()
    await peer.send({"type": "cancel"})
    assert (await peer.frame())["code"] == "PERMISSION_DENIED"
    assert await manager.get_active_stream_ids() == [stream_id]


def nobody(user: Any, session_key: str | None, stream: Any) -> bool:
    return False


async def test_disconnect_deregisters_and_leaves_the_stream_running(
    manager: StreamingManager, connect: Any, session_key: str
) -> None:
    stream_id = await manager.create_stream(session_key=session_key)
    peer = await connect(stream_id)
    await peer.frame()
    await peer.communicator.disconnect()
    assert await manager.get_client_count_for_stream(stream_id) == 0
    assert await manager.push_chunk(stream_id, delta(stream_id, "on")) == 1


async def test_deregister_client_closes_the_socket(
    manager: StreamingManager, connect: Any, session_key: str
) -> None:
    stream_id = await manager.create_stream(session_key=session_key)
    peer = await connect(stream_id)
    client_id = (await peer.frame())["client_id"]
    await manager.deregister_client(stream_id, client_id)
    frames, code = await peer.frames_until_close()
    assert code == CloseCode.DEREGISTERED
    assert frames == [{"type": "closed", "reason": "deregistered", "last_seq": 0}]


@override_settings(STREAMING_APP={"ON_CLIENT_SEND_ERROR_BEHAVIOR": "deregister_client"})
async def test_failed_socket_send_applies_the_policy(
    connect: Any, session_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = get_streaming_manager()  # after the override
    from streaming_app.consumers import StreamConsumer

    stream_id = await manager.create_stream(session_key=session_key)
    peer = await connect(stream_id)
    await peer.frame()
    original = StreamConsumer.send

    async def failing_send(self: StreamConsumer, text_data: str | None = None, **kw: Any) -> None:
        if text_data and '"type":"chunk"' in text_data:
            raise ConnectionResetError("peer vanished")  # a dead TCP peer, mid-send
        await original(self, text_data=text_data, **kw)

    monkeypatch.setattr(StreamConsumer, "send", failing_send)
    await manager.push_chunk(stream_id, delta(stream_id, "lost"))
    frames, code = await peer.frames_until_close()
    assert code == CloseCode.DEREGISTERED
    assert frames == [{"type": "closed", "reason": "send failed", "last_seq": 1}]
    assert await manager.get_client_count_for_stream(stream_id) == 0


async def test_lag_is_visible_to_the_manager(
    manager: StreamingManager, connect: Any, session_key: str
) -> None:
    stream_id = await manager.create_stream(session_key=session_key)
    for i in range(4):
        await manager.push_chunk(stream_id, delta(stream_id, str(i)))
    peer = await connect(stream_id, query="last_seq=4")
    client_id = (await peer.frame())["client_id"]
    assert await manager.get_client_lags(stream_id) == {client_id: 0}
    # A client of another worker, as that worker's last heartbeat left it.
    await StreamClientRow.objects.acreate(
        stream_id=stream_id, client_id="ws-remote", channel_name="x", worker_id="elsewhere",
        delivered_seq=1,
    )  # fmt: skip
    for i in range(3):
        await manager.push_chunk(stream_id, delta(stream_id, str(i)))
    for _ in range(3):
        await peer.frame()
    assert await manager.get_client_lags(stream_id) == {client_id: 0, "ws-remote": 6}


async def test_resume_while_chunks_keep_arriving_has_no_gap_and_no_duplicate(
    manager: StreamingManager, connect: Any, session_key: str
) -> None:
    stream_id = await manager.create_stream(session_key=session_key)

    async def produce() -> None:
        for i in range(1, 301):
            await manager.push_chunk(stream_id, delta(stream_id, str(i)))
            await asyncio.sleep(0.002)
        await manager.close_stream(stream_id, "done")

    producer = asyncio.create_task(produce())
    await eventually(lambda: not producer.done() and manager.stats["chunks_pushed"] >= 40)
    peer = await connect(stream_id, query="last_seq=20")
    frames, code = await peer.frames_until_close()
    await producer
    assert frames[0]["type"] == "subscribed", frames[:2]
    assert [f["seq"] for f in frames if f["type"] == "chunk"] == list(range(21, 301))
    assert code == CloseCode.STREAM_CLOSED


@override_settings(
    CHANNEL_LAYERS={"default": {"BACKEND": "channels.layers.InMemoryChannelLayer",
                                "CONFIG": {"capacity": 5}}}
)  # fmt: skip
async def test_sweeper_repairs_a_client_whose_channel_dropped_the_tail(
    connect: Any, session_key: str, slow_consumer: None
) -> None:
    manager = get_streaming_manager()  # after the override
    stream_id = await manager.create_stream(session_key=session_key)
    peer = await connect(stream_id)
    await peer.frame()
    for i in range(1, 21):  # the channel holds 5: the tail is dropped
        await manager.push_chunk(stream_id, delta(stream_id, str(i)))
    received = []
    while not await peer.silent():
        received.append(await peer.frame())
    got = len(received)
    assert texts(received) == [str(i) for i in range(1, got + 1)]
    assert got < 20
    await manager.sweep()  # remembers where the client is
    assert await peer.silent()
    await manager.sweep()  # no progress since: nudged
    rest = [await peer.frame() for _ in range(20 - got)]
    assert texts(rest) == [str(i) for i in range(got + 1, 21)]
    assert await peer.silent()


async def test_sweeper_ends_a_client_that_missed_the_close(
    manager: StreamingManager, connect: Any, session_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream_id, peer = await following(manager, connect, session_key)

    async def lost(*args: Any, **kwargs: Any) -> None:
        raise StreamError(GMIErrorCode.BACKEND_UNAVAILABLE, "publish lost")  # a Redis blip

    with monkeypatch.context() as patch:
        patch.setattr(manager.layer, "publish_closed", lost)
        await manager.close_stream(stream_id, "done")  # closed in history and rows, not told
    assert await peer.silent()
    with pytest.raises(StreamError):  # nothing gets through after the close
        await manager.push_chunk(stream_id, delta(stream_id, "2"))
    await manager.close_stream(stream_id, "again")  # closed already: no second notice
    # A sweep may fall between a close and its notice (the row is written in between): a
    # client still open on a stream that was closed at the sweep before is ended.
    await manager.sweep()
    assert await peer.silent()
    await manager.sweep()
    frames, code = await peer.frames_until_close()
    assert frames == [{"type": "closed", "reason": "done", "last_seq": 1}]
    assert code == CloseCode.STREAM_CLOSED


async def test_a_bug_in_a_handler_is_logged_closes_4500_and_releases_the_client(
    manager: StreamingManager, connect: Any, session_key: str, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    stream_id = await manager.create_stream(session_key=session_key)
    peer = await connect(stream_id)
    await peer.frame()

    def bug(*args: Any, **kwargs: Any) -> None:
        raise KeyError("a bug")  # no test can cause a real bug in our code on purpose

    monkeypatch.setattr("streaming_app.clients.chunk_frame", bug)
    await manager.push_chunk(stream_id, delta(stream_id, "1"))
    frames, code = await peer.frames_until_close()
    assert code == CloseCode.INTERNAL_ERROR
    assert frames == [{"type": "error", "code": "internal_error",
                       "message": "internal server error"}]  # fmt: skip
    assert await manager.get_client_count_for_stream(stream_id) == 0
    record = next(r for r in caplog.records if r.getMessage().endswith("internal error"))
    assert record.exc_info is not None and "a bug" in str(record.exc_info[1])


async def test_a_failing_history_closes_with_4503_instead_of_crashing(
    manager: StreamingManager, connect: Any, session_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream_id, peer = await following(manager, connect, session_key)

    async def unreachable(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("Redis went away")  # the outage a test cannot stage in memory

    monkeypatch.setattr(manager.history, "read_after", unreachable)
    await manager.push_chunk(stream_id, delta(stream_id, "2"))
    await manager.push_chunk(stream_id, delta(stream_id, "3"))
    # seq 4's event never arrives (as with a full channel): filling the hole needs history
    await manager.layer.publish_chunk(stream_id, 5, encode_chunk(delta(stream_id, "5"),
                                      stream_id=stream_id, max_bytes=1000))  # fmt: skip
    frames, code = await peer.frames_until_close()
    assert code == CloseCode.UNAVAILABLE
    assert frames[-1]["code"] == "BACKEND_UNAVAILABLE"
    assert await manager.get_client_count_for_stream(stream_id) == 0


async def test_a_closed_stream_replays_what_the_client_missed_then_says_closed(
    manager: StreamingManager, connect: Any, session_key: str
) -> None:
    stream_id = await manager.create_stream(session_key=session_key)
    for i in range(1, 5):
        await manager.push_chunk(stream_id, delta(stream_id, str(i)))
    await manager.close_stream(stream_id, "over")
    frames, code = await (await connect(stream_id, query="last_seq=2")).frames_until_close()
    assert code == CloseCode.STREAM_GONE
    assert texts(frames) == ["3", "4"]
    assert frames[-1] == {"type": "closed", "reason": "over", "last_seq": 4}


async def test_shutdown_tells_clients_to_come_back_for_the_rest(
    manager: StreamingManager, connect: Any, session_key: str
) -> None:
    stream_id = await manager.create_stream(session_key=session_key)
    peer = await connect(stream_id)
    await peer.frame()
    await manager.push_chunk(stream_id, delta(stream_id, "1"))
    await manager.shutdown()
    frames, code = await peer.frames_until_close()
    assert code == CloseCode.SERVICE_RESTART
    assert frames[-1] == {"type": "reconnect", "reason": "Server shutting down", "last_seq": 1}


async def test_a_channel_layer_that_fails_at_registration_is_4503_and_leaves_no_row(
    manager: StreamingManager, connect: Any, session_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream_id = await manager.create_stream(session_key=session_key)

    async def down(*args: Any, **kwargs: Any) -> None:
        raise StreamError(GMIErrorCode.BACKEND_UNAVAILABLE, "group_add failed")  # Redis down

    monkeypatch.setattr(manager.layer, "join", down)
    frames, code = await (await connect(stream_id)).frames_until_close()
    assert code == CloseCode.UNAVAILABLE
    assert [f["code"] for f in frames] == ["BACKEND_UNAVAILABLE"]
    assert await manager.get_client_count_for_stream(stream_id) == 0
    assert len(manager.worker) == 0
