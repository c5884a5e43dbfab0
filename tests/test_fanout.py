"""WebSocket clients of one stream in one process share one subscription (the stream's hub):
each event is received once and handed to them; a client whose send waits for its peer holds
up neither the hub nor the others."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from channels.layers import get_channel_layer

from streaming_app.fanout import start_eagerly
from streaming_app.layers import group_name
from streaming_app.manager import StreamingManager

from .conftest import delta, eventually

pytestmark = pytest.mark.django_db(transaction=True)


def members(stream_id: str) -> set[str]:
    layer: Any = get_channel_layer()
    return set(layer.groups.get(group_name(stream_id), {}))


async def test_clients_of_a_stream_share_one_member_of_its_group(
    manager: StreamingManager, connect: Any, session_key: str
) -> None:
    stream_id = await manager.create_stream(session_key=session_key)
    peers = [await connect(stream_id) for _ in range(3)]
    for peer in peers:
        await peer.frame()
    (hub,) = members(stream_id)
    assert hub.startswith("streaming.hub.")
    for text in ("a", "b", "c"):
        await manager.push_chunk(stream_id, delta(stream_id, text))
    for peer in peers:
        frames = [await peer.frame() for _ in range(3)]
        assert [f["chunk"]["text_delta"] for f in frames] == ["a", "b", "c"]
    for peer in peers:
        await peer.communicator.disconnect()
    await eventually(lambda: not members(stream_id) and not manager.worker.fanout.hubs)


async def test_a_client_whose_send_waits_holds_up_no_one(
    manager: StreamingManager, connect: Any, session_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from streaming_app.consumers import StreamConsumer

    stream_id = await manager.create_stream(session_key=session_key)
    slow, fast = await connect(stream_id), await connect(stream_id)
    slow_id = (await slow.frame())["client_id"]
    await fast.frame()
    peer_reads = asyncio.Event()  # the slow peer's socket drains (uvicorn's send waits for it)
    original = StreamConsumer.send

    async def send(self: StreamConsumer, *args: Any, **kwargs: Any) -> None:
        if self.client_id == slow_id:
            await peer_reads.wait()
        await original(self, *args, **kwargs)

    monkeypatch.setattr(StreamConsumer, "send", send)
    for text in ("a", "b", "c"):
        await manager.push_chunk(stream_id, delta(stream_id, text))
    frames = [await fast.frame() for _ in range(3)]  # while the slow one waits
    assert [f["chunk"]["text_delta"] for f in frames] == ["a", "b", "c"]
    assert await slow.silent()
    peer_reads.set()
    frames = [await slow.frame() for _ in range(3)]
    assert [f["seq"] for f in frames] == [1, 2, 3]
    assert await slow.silent()


async def test_start_eagerly_finishes_what_does_not_wait_and_hands_on_what_does() -> None:
    ran: list[str] = []

    async def quick() -> None:
        ran.append("quick")

    assert start_eagerly(quick()) is None
    assert ran == ["quick"]
    gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def waits() -> None:
        ran.append(await gate)
        await asyncio.sleep(0)
        ran.append("after")

    task = start_eagerly(waits())
    assert task is not None and not task.done()
    gate.set_result("woken")
    await task
    assert ran == ["quick", "woken", "after"]

    async def fails() -> None:
        await asyncio.sleep(0)
        raise KeyError("in the task")

    failing = start_eagerly(fails())
    assert failing is not None
    with pytest.raises(KeyError):
        await failing


async def test_a_client_busy_for_long_reads_what_it_was_offered_from_history(
    manager: StreamingManager,
    connect: Any,
    session_key: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from streaming_app.clients import Follower
    from streaming_app.consumers import StreamConsumer

    monkeypatch.setattr(Follower, "MAILBOX_EVENTS", 5)
    stream_id = await manager.create_stream(session_key=session_key)
    peer = await connect(stream_id)
    await peer.frame()
    original = StreamConsumer.send

    async def slow_send(self: StreamConsumer, *args: Any, **kwargs: Any) -> None:
        await asyncio.sleep(0.02)  # slower than the producer: its mailbox fills
        await original(self, *args, **kwargs)

    monkeypatch.setattr(StreamConsumer, "send", slow_send)
    for i in range(1, 41):
        await manager.push_chunk(stream_id, delta(stream_id, str(i)))
    frames = [await peer.frame() for _ in range(40)]
    assert [f["seq"] for f in frames] == list(range(1, 41))
    assert [f["chunk"]["text_delta"] for f in frames] == [str(i) for i in range(1, 41)]
    assert await peer.silent()
    assert any("reads them from history" in r.getMessage() for r in caplog.records)
    assert any("catch-up" in r.getMessage() for r in caplog.records)


async def test_what_waits_in_a_mailbox_is_handled_without_a_trip_through_the_layer(
    manager: StreamingManager, connect: Any, session_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A close (an event the hub does not write itself) and chunks that came meanwhile are
    handled in order by a task of the client's own, not by a message to its channel."""
    layer: Any = get_channel_layer()
    sent_to: list[str] = []
    original_send = layer.send

    async def send(channel: str, message: dict[str, Any]) -> None:
        if not channel.startswith("streaming.hub."):  # not the stream's events to its hub
            sent_to.append(message["type"])
        await original_send(channel, message)

    monkeypatch.setattr(layer, "send", send)
    stream_id = await manager.create_stream(session_key=session_key)
    peer = await connect(stream_id)
    await peer.frame()
    await manager.push_chunks(stream_id, [delta(stream_id, str(i)) for i in range(1, 4)])
    await manager.close_stream(stream_id, "done")
    frames = [await peer.frame() for _ in range(4)]
    assert [f.get("seq") for f in frames[:3]] == [1, 2, 3]
    assert frames[3]["type"] == "closed" and frames[3]["reason"] == "done"
    assert sent_to == []


async def test_a_write_started_eagerly_leaves_the_callers_context_as_it_was() -> None:
    """A hub write that waits on a database call (a client released as it ends) must not
    leave asgiref's marker of that call in the hub's context: every client task the hub
    starts later (a mailbox being emptied) inherits it, and its own database calls failed
    with "Single thread executor already being used, would deadlock"."""
    import contextvars

    from asgiref.sync import sync_to_async

    marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker", default="caller's")
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def release() -> None:
        marker.set("the write's")
        await sync_to_async(gate.get_loop().call_soon_threadsafe)(gate.set_result, None)
        await gate
        assert marker.get() == "the write's"

    writing = start_eagerly(release())
    assert writing is not None and not writing.done()
    assert marker.get() == "caller's"
    assert await sync_to_async(lambda: "called")() == "called"  # no "would deadlock"
    await writing


async def test_a_mailbox_that_overflows_while_the_clients_own_task_empties_it_is_emptied_whole(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The mailbox is thinned in place: the task emptying it (here the client's own, busy in
    a frame of its own) goes on with what is left, each event once, the close included."""
    from streaming_app.clients import Follower

    class Recorder(Follower):
        transport = "test"
        stream_id, client_id = "s", "c"
        MAILBOX_EVENTS = 3

        def __init__(self) -> None:
            self.handled: list[str] = []
            self.gate = asyncio.Event()

        async def dispatch_event(self, event: dict[str, Any]) -> None:
            self.handled.append(f"{event['type']}{event.get('seq', '')}")
            if event["type"] == "stream.sync":
                await self.gate.wait()  # held up while the hub goes on offering

    client = Recorder()
    client._busy = True  # its own task is handling something (as dispatch marks it)
    await client.offer({"type": "stream.sync"})
    emptying = asyncio.create_task(client.empty_mailbox())  # as dispatch does at its end
    await asyncio.sleep(0)
    for seq in range(1, 6):  # the fourth finds it full: the chunks in it go (history has them)
        await client.offer({"type": "stream.chunk", "seq": seq, "chunk": "{}"})
    await client.offer({"type": "stream.closed", "reason": "done", "last_seq": 5})
    client.gate.set()
    await emptying
    assert client.handled == ["stream.sync", "stream.chunk4", "stream.chunk5", "stream.closed"]
    assert not client._mailbox
    assert any("reads them from history" in r.getMessage() for r in caplog.records)


def held_up(
    manager: StreamingManager, call: str, slow_id: str, monkeypatch: pytest.MonkeyPatch
) -> asyncio.Event:
    """The layer's ``call`` (join or leave) for ``slow_id``'s group waits until the returned
    event is set, as a slow Redis round trip would; for other streams it answers at once."""
    layer = manager.layer
    original = getattr(layer, call)

    async def slow(stream_id: str, channel: str) -> None:
        if stream_id == slow_id:
            await gate.wait()
        await original(stream_id, channel)

    gate = asyncio.Event()
    monkeypatch.setattr(layer, call, slow)
    return gate


async def test_a_stream_whose_hub_waits_on_the_layer_holds_up_no_other_stream(
    manager: StreamingManager, connect: Any, session_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening a stream's hub waits on the layer (a Redis round trip); the clients of other
    streams that come meanwhile do not wait behind it (in a connect storm they queued behind
    every other stream's, and leaving ones behind every hub being closed)."""
    slow_id = await manager.create_stream(session_key=session_key)
    other_id = await manager.create_stream(session_key=session_key)
    gate = held_up(manager, "join", slow_id, monkeypatch)
    waiting = await connect(slow_id)  # accepted; its hub is opening
    await eventually(lambda: slow_id in manager.worker.fanout._locks)
    other = await connect(other_id)
    assert (await other.frame())["type"] == "subscribed"  # not behind the slow stream's hub
    gate.set()
    assert (await waiting.frame())["type"] == "subscribed"
    for peer in (waiting, other):
        await peer.communicator.disconnect()
    await eventually(lambda: not manager.worker.fanout.hubs and not manager.worker.fanout._locks)
    assert not members(slow_id) and not members(other_id)


async def test_a_stream_whose_hub_is_closing_holds_up_no_other_stream(
    manager: StreamingManager, connect: Any, session_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for the last client of a stream leaving: its hub's close waits on the layer,
    the clients of other streams leave meanwhile."""
    slow_id = await manager.create_stream(session_key=session_key)
    other_id = await manager.create_stream(session_key=session_key)
    gate = held_up(manager, "leave", slow_id, monkeypatch)
    waiting, other = await connect(slow_id), await connect(other_id)
    for peer in (waiting, other):
        assert (await peer.frame())["type"] == "subscribed"
    closing = asyncio.create_task(waiting.communicator.disconnect(timeout=30))
    await eventually(lambda: slow_id in manager.worker.fanout._locks)  # its hub is closing
    async with asyncio.timeout(5):
        await other.communicator.disconnect()
    assert other_id not in manager.worker.fanout.hubs and not members(other_id)
    gate.set()
    await closing
    await eventually(lambda: not manager.worker.fanout.hubs and not manager.worker.fanout._locks)
    assert not members(slow_id)
