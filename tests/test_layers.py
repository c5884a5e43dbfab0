"""The channel-layer adapter, and one push per Redis round trip on the pub/sub layer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
from channels.layers import InMemoryChannelLayer
from channels_redis.core import RedisChannelLayer
from channels_redis.pubsub import RedisPubSubChannelLayer
from django.test import override_settings

from streaming_app.layers import Inbox, StreamLayer, control_group_name, group_name
from streaming_app.manager import StreamingManager, get_streaming_manager

from .conftest import RecordingClient, delta, eventually

pytestmark = pytest.mark.django_db(transaction=True)


def test_group_names() -> None:
    assert group_name("abc") == "streaming.abc"
    assert control_group_name("abc") == "streaming.abc.control"


def test_the_pubsub_fast_path_is_recognised_only_where_it_is_safe() -> None:
    address = "redis://127.0.0.1:6390/0"
    plain = RedisPubSubChannelLayer(hosts=[{"address": address}])
    assert StreamLayer(plain).pubsub_group_prefix() == (address, "asgi__group__streaming.")
    prefixed = RedisPubSubChannelLayer(hosts=[address], prefix="site")
    assert StreamLayer(prefixed).pubsub_group_prefix() == (address, "site__group__streaming.")
    for layer in (
        RedisPubSubChannelLayer(hosts=[address], symmetric_encryption_keys=["secret"]),
        RedisPubSubChannelLayer(hosts=[address, "redis://127.0.0.1:6391/0"]),
        RedisChannelLayer(hosts=[address]),
        InMemoryChannelLayer(),
    ):
        assert StreamLayer(layer).pubsub_group_prefix() is None


async def _manager_on(redis_url: str, backend: str, config: dict[str, Any]
                      ) -> AsyncIterator[StreamingManager]:  # fmt: skip
    """A manager whose layer (``backend`` with ``config``) and history share ``redis_url``."""
    layers = {"default": {"BACKEND": backend, "CONFIG": config}}
    streaming: dict[str, Any] = {
        "HISTORY_BACKEND": "streaming_app.redis_history.RedisHistory",
        "REDIS_URL": redis_url,
    }
    with override_settings(CHANNEL_LAYERS=layers, STREAMING_APP=streaming):
        manager = get_streaming_manager()
        yield manager
        await manager.shutdown()


@pytest.fixture
async def redis_manager(redis_url: str) -> AsyncIterator[StreamingManager]:
    async for manager in _manager_on(redis_url, "channels_redis.pubsub.RedisPubSubChannelLayer",
                                     {"hosts": [{"address": redis_url}]}):  # fmt: skip
        yield manager


async def test_a_push_appends_and_publishes_in_one_round_trip(
    redis_manager: StreamingManager,
) -> None:
    manager = redis_manager
    assert manager._publish_prefix == "asgi__group__streaming."
    stream_id = await manager.create_stream()
    # A client in another process: its own channel, joined to the group, read directly.
    layer = manager.layer.layer
    channel = await layer.new_channel()
    await manager.layer.join(stream_id, channel)
    seqs = [await manager.push_chunk(stream_id, delta(stream_id, str(i))) for i in range(5)]
    assert manager.stats["fast_path_proven"] == 1  # it proved itself before the first push
    events = [await layer.receive(channel) for _ in range(5)]
    assert [e["seq"] for e in events] == seqs == [1, 2, 3, 4, 5]
    assert [e["type"] for e in events] == ["stream.chunk"] * 5
    assert '"text_delta":"3"' in events[3]["chunk"]
    # With a plain client in this process, pushes take the path that waits for it.
    client = RecordingClient("local")
    await manager.register_client(stream_id, client)
    await manager.push_chunk(stream_id, delta(stream_id, "late"))
    await eventually(lambda: client.texts[-1:] == ["late"])
    assert client.texts == ["0", "1", "2", "3", "4", "late"]


async def test_a_fast_path_that_fails_its_self_test_falls_back_loudly(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # As if channels_redis had renamed its group channels: what the history would publish to
    # is no longer what the layer listens on (a change no test can make for real).
    monkeypatch.setattr(StreamLayer, "pubsub_group_prefix",
                        lambda self: (redis_url, "asgi__renamed__streaming."))  # fmt: skip
    layers = {"default": {"BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
                          "CONFIG": {"hosts": [{"address": redis_url}]}}}  # fmt: skip
    streaming = {"HISTORY_BACKEND": "streaming_app.redis_history.RedisHistory",
                 "REDIS_URL": redis_url}  # fmt: skip
    with override_settings(CHANNEL_LAYERS=layers, STREAMING_APP=streaming):
        manager = get_streaming_manager()
        stream_id = await manager.create_stream()
        channel = await manager.layer.layer.new_channel()
        await manager.layer.join(stream_id, channel)
        assert await manager.push_chunk(stream_id, delta(stream_id, "still")) == 1
        event = await manager.layer.layer.receive(channel)
        assert (event["type"], event["seq"]) == ("stream.chunk", 1)  # through group_send
        assert manager.stats["fast_path_failed"] == 1
        assert any("one-round-trip push disabled" in r.getMessage() for r in caplog.records)
        await manager.shutdown()


def test_the_core_fast_path_is_recognised_only_where_it_is_safe() -> None:
    address = "redis://127.0.0.1:6390/0"
    plain = RedisChannelLayer(hosts=[address])
    target = "core\nasgi\n60\n86400\n100\nasgi:group:streaming."
    assert StreamLayer(plain).core_group_target() == (address, target)
    assert StreamLayer(plain).group_target() == (address, target)
    tuned = RedisChannelLayer(hosts=[address], prefix="site", expiry=30, capacity=500)
    assert StreamLayer(tuned).core_group_target() == (
        address,
        "core\nsite\n30\n86400\n500\nsite:group:streaming.",
    )
    for layer in (
        RedisChannelLayer(hosts=[address], symmetric_encryption_keys=["secret"]),
        RedisChannelLayer(hosts=[address], channel_capacity={"streaming.*": 10}),
        RedisChannelLayer(hosts=[address, "redis://127.0.0.1:6391/0"]),
        RedisChannelLayer(hosts=[address], random_prefix_length=0),
        RedisPubSubChannelLayer(hosts=[{"address": address}]),
        InMemoryChannelLayer(),
    ):
        assert StreamLayer(layer).core_group_target() is None


@pytest.fixture
async def core_manager(redis_url: str) -> AsyncIterator[StreamingManager]:
    async for manager in _manager_on(redis_url, "channels_redis.core.RedisChannelLayer",
                                     {"hosts": [redis_url], "capacity": 4}):  # fmt: skip
        yield manager


async def test_a_push_on_the_core_layer_sends_in_the_append_and_says_when_a_channel_is_full(
    core_manager: StreamingManager, caplog: pytest.LogCaptureFixture
) -> None:
    manager = core_manager
    assert manager._publish_prefix.startswith("core\n")
    stream_id = await manager.create_stream()
    # Clients in another process: their own channels, joined to the group, read directly;
    # two of them share the process's sorted set, one message names both.
    layer = manager.layer.layer
    channels = [await layer.new_channel() for _ in range(2)]
    for channel in channels:
        await manager.layer.join(stream_id, channel)
    seqs = [await manager.push_chunk(stream_id, delta(stream_id, str(i))) for i in range(3)]
    assert manager.stats["fast_path_proven"] == 1  # it proved itself before the first push
    for channel in channels:
        events = [await layer.receive(channel) for _ in range(3)]
        assert [e["seq"] for e in events] == seqs == [1, 2, 3]
        assert [e["type"] for e in events] == ["stream.chunk"] * 3
        assert '"text_delta":"2"' in events[2]["chunk"]
    # A batch shares one push time: its chunks still come out in seq order.
    batch = await manager.push_chunks(stream_id, [delta(stream_id, f"b{i}") for i in range(3)])
    for channel in channels:
        assert [(await layer.receive(channel))["seq"] for _ in range(3)] == batch == [4, 5, 6]
    # The layer's capacity (4) holds: what does not fit is dropped as group_send drops it,
    # with a log line (the clients repair the hole from history).
    for i in range(6):
        await manager.push_chunk(stream_id, delta(stream_id, f"more {i}"))
    assert [(await layer.receive(channels[0]))["seq"] for _ in range(4)] == [7, 8, 9, 10]
    assert any("over capacity" in r.getMessage() for r in caplog.records)


# -- Inbox: every channel given back once, whoever stops reading it -----------------------


def _subscriptions(redis_url: str, channel: str) -> int:
    """How many subscriptions Redis holds for the inbox's channel."""
    with redis.Redis.from_url(redis_url) as admin:
        return sum(count for name, count in admin.pubsub_numsub(*admin.pubsub_channels())
                   if name.decode().endswith(channel))  # fmt: skip


async def test_an_inbox_reads_what_is_sent_to_it_and_closes_once(redis_url: str) -> None:
    layer = RedisPubSubChannelLayer(hosts=[{"address": redis_url}])
    inbox = Inbox(layer)
    name = await inbox.open("test.inbox.")
    assert _subscriptions(redis_url, name) == 1
    await layer.send(name, {"type": "one"})
    assert await inbox.get() == {"type": "one"}
    await inbox.close()
    await inbox.close()  # again: nothing more to give back
    assert _subscriptions(redis_url, name) == 0
    with pytest.raises(RuntimeError, match="closed"):
        await inbox.get()
    await layer.flush()


async def _read_in_a_task(redis_url: str) -> tuple[Any, Inbox, str, asyncio.Task[Any]]:
    """An inbox on the pub/sub layer, and a task waiting in its ``get``."""
    layer = RedisPubSubChannelLayer(hosts=[{"address": redis_url}])
    inbox = Inbox(layer)
    name = await inbox.open("test.inbox.")
    getting = asyncio.create_task(inbox.get())
    await eventually(lambda: inbox._getter is getting)
    return layer, inbox, name, getting


async def test_a_get_cancelled_while_it_waits_gives_the_channel_back(redis_url: str) -> None:
    layer, inbox, name, getting = await _read_in_a_task(redis_url)
    getting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await getting
    await eventually(lambda: _subscriptions(redis_url, name) == 0)
    await inbox.close()  # the cancelled receive released it: close subscribes nothing again
    assert _subscriptions(redis_url, name) == 0
    await layer.flush()


async def test_closing_an_inbox_that_another_task_reads_ends_that_read(redis_url: str) -> None:
    layer, inbox, name, getting = await _read_in_a_task(redis_url)
    await asyncio.wait_for(inbox.close(), 5)
    assert getting.cancelled()
    assert _subscriptions(redis_url, name) == 0
    await layer.flush()
