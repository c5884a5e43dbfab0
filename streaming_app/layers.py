"""How streams talk to Channels: group names, event shapes, and the sends the manager makes.

A stream is the group ``streaming.<stream_id>``. Events:

- ``stream.chunk``        ``{"seq", "chunk"?, "at"}`` (chunk = its JSON text, encoded once by the
  producer; absent when over ``INLINE_CHUNK_BYTES``: followers read it from the history, so a
  channel's backlog of big chunks holds their seqs, not their bytes)
- ``stream.closed``       ``{"reason", "last_seq", "code"}``, also to ``streaming.<id>.control``
- ``stream.deregistered`` ``{"stream_id", "reason", "code", "close"}`` sent to one client's
  channel: the manager removed it (``close``: a plain client's ``close()`` is called too)
- ``stream.sync``         ``{"head_seq", "closed", "reason"}`` sent by the sweeper to a client
  that fell behind (its channel dropped messages): catch up to ``head_seq``, close if closed

The group's members are the followers' own channels, except for WebSocket clients: their
process joins the group once per stream, with a hub that hands each event to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Protocol

from channels.exceptions import ChannelFull

from .conf import app_settings
from .exceptions import GMIErrorCode, StreamError

logger = logging.getLogger(__name__)

GROUP_PREFIX = "streaming."

CHUNK = "stream.chunk"
CLOSED = "stream.closed"
DEREGISTERED = "stream.deregistered"
SYNC = "stream.sync"


class ChannelLayer(Protocol):
    """The parts of a Channels layer this app calls."""

    async def send(self, channel: str, message: dict[str, Any]) -> None: ...

    async def receive(self, channel: str) -> dict[str, Any]: ...

    async def new_channel(self, prefix: str = ...) -> str: ...

    async def group_add(self, group: str, channel: str) -> None: ...

    async def group_discard(self, group: str, channel: str) -> None: ...

    async def group_send(self, group: str, message: dict[str, Any]) -> None: ...


def group_name(stream_id: str) -> str:
    """The Channels group of a stream's clients."""
    return GROUP_PREFIX + stream_id


def control_group_name(stream_id: str) -> str:
    """The group of those who only need to know when a stream closes (its producers)."""
    return f"{GROUP_PREFIX}{stream_id}.control"


class StreamLayer:
    """Sends stream events over a channel layer; a failing layer raises ``StreamError``."""

    def __init__(self, layer: ChannelLayer) -> None:
        self.layer = layer

    @property
    def crosses_processes(self) -> bool:
        """Whether other processes reach this layer's channels (not the in-memory layer)."""
        from channels.layers import InMemoryChannelLayer

        return not isinstance(self.layer, InMemoryChannelLayer)

    @property
    def hubs(self) -> bool:
        """Whether a stream's WebSocket clients in a process share one member of its group
        (fanout.py): on the pub/sub and in-memory layers, which hand a group's event to a
        process once. Channels' core Redis layer keeps a channel per client."""
        from channels.layers import InMemoryChannelLayer

        try:
            from channels_redis.pubsub import RedisPubSubChannelLayer
        except ImportError:  # pragma: no cover - channels_redis is a dependency
            return isinstance(self.layer, InMemoryChannelLayer)
        return isinstance(self.layer, InMemoryChannelLayer | RedisPubSubChannelLayer)

    def pubsub_group_prefix(self) -> tuple[str, str] | None:
        """``(redis address, channel prefix)`` when the layer is channels_redis's pub/sub
        layer on one Redis, sending plain msgpack: then a group's events can be published to
        ``prefix + group`` by anyone on that Redis (the history does, in the same round trip
        as the append). None for any other layer or setting, or if channels_redis changed."""
        try:
            from channels_redis.pubsub import RedisPubSubChannelLayer

            layer: Any = self.layer
            if not isinstance(layer, RedisPubSubChannelLayer):
                return None
            serializer = layer._serializer
            hosts = layer._kwargs.get("hosts") or (layer._args[0] if layer._args else None)
            if (
                type(serializer).__name__ != "MsgPackSerializer"
                or serializer.crypter is not None
                or serializer.random_prefix_length
                or not hosts
                or len(hosts) != 1
            ):
                return None
            host = hosts[0]
            address = host.get("address") if isinstance(host, dict) else host
            if not isinstance(address, str):
                return None
            prefix = layer._kwargs.get("prefix", "asgi")
            return address, f"{prefix}__group__{GROUP_PREFIX}"
        except (ImportError, AttributeError, IndexError, TypeError):
            return None

    def core_group_target(self) -> tuple[str, str] | None:
        """``(redis address, group target prefix)`` when the layer is channels_redis's core
        ``RedisChannelLayer`` on one Redis, as it comes (plain msgpack after its 12-byte
        prefix, one capacity for every channel, its own ``group_send``): then the history's
        append script can do what its ``group_send`` does, in the same round trip (the target
        names the layer's prefix, expiries, capacity and the group's key, ``+ stream_id``).
        None for any other layer or setting, or if channels_redis changed."""
        try:
            from channels_redis.core import RedisChannelLayer

            layer: Any = self.layer
            if not isinstance(layer, RedisChannelLayer):
                return None
            serializer = layer._serializer
            if (
                type(layer).group_send is not RedisChannelLayer.group_send
                or type(layer)._group_key is not RedisChannelLayer._group_key
                or type(serializer).__name__ != "MsgPackSerializer"
                or serializer.crypter is not None
                or serializer.random_prefix_length != 12
                or layer.channel_capacity
                or len(layer.hosts) != 1
                or "\n" in layer.prefix
            ):
                return None
            address = layer.hosts[0].get("address")
            if not isinstance(address, str):
                return None
            group_key = layer._group_key(GROUP_PREFIX).decode()
            fields = (layer.prefix, int(layer.expiry), int(layer.group_expiry),
                      int(layer.capacity), group_key)  # fmt: skip
            return address, "core\n" + "\n".join(map(str, fields))
        except (ImportError, AttributeError, IndexError, TypeError, ValueError):
            return None

    def group_target(self) -> tuple[str, str] | None:
        """Where the history's append script can send a group's events itself: the pub/sub
        layer's group channel, or the core layer's group (see the two methods above)."""
        return self.pubsub_group_prefix() or self.core_group_target()

    async def publish_chunk(self, stream_id: str, seq: int, chunk_json: str) -> None:
        event: dict[str, Any] = {"type": CHUNK, "seq": seq, "at": time.time()}
        if len(chunk_json) <= app_settings.INLINE_CHUNK_BYTES:
            event["chunk"] = chunk_json
        await self._call(stream_id, "group_send", group_name(stream_id), event)

    async def publish_closed(self, stream_id: str, reason: str, last_seq: int, code: int) -> None:
        event = {"type": CLOSED, "reason": reason, "last_seq": last_seq, "code": code}
        await self._call(stream_id, "group_send", group_name(stream_id), event)
        await self._call(stream_id, "group_send", control_group_name(stream_id), event)

    async def tell_deregistered(
        self, stream_id: str, channel: str, reason: str, code: int, *, close: bool = True
    ) -> None:
        await self._call(stream_id, "send", channel, {
            "type": DEREGISTERED, "stream_id": stream_id, "reason": reason, "code": code,
            "close": close,
        })  # fmt: skip

    async def nudge(
        self, stream_id: str, channel: str, head_seq: int, closed: bool, reason: str
    ) -> None:
        await self._call(stream_id, "send", channel, {
            "type": SYNC, "head_seq": head_seq, "closed": closed, "reason": reason,
        })  # fmt: skip

    async def join(self, stream_id: str, channel: str) -> None:
        await self._call(stream_id, "group_add", group_name(stream_id), channel)

    async def leave(self, stream_id: str, channel: str) -> None:
        await self._call(stream_id, "group_discard", group_name(stream_id), channel)

    async def watch(self, stream_id: str, channel: str) -> None:
        await self._call(stream_id, "group_add", control_group_name(stream_id), channel)

    async def unwatch(self, stream_id: str, channel: str) -> None:
        await self._call(stream_id, "group_discard", control_group_name(stream_id), channel)

    async def _call(self, stream_id: str, method: str, *args: Any) -> None:
        try:
            await getattr(self.layer, method)(*args)
        except ChannelFull:  # the client sees a hole in seq and repairs it from history
            logger.info("channel full on %s for stream %s", method, stream_id)
        except Exception as exc:
            logger.exception("channel layer %s failed for stream %s", method, stream_id)
            raise StreamError(
                GMIErrorCode.BACKEND_UNAVAILABLE,
                f"channel layer {method} failed for stream {stream_id!r}: {exc}",
                stream_id=stream_id,
            ) from exc


class Inbox:
    """A channel of this process's own and the one ``receive`` that reads it.

    Channels has no ``delete_channel``: a layer gives back a channel (its Redis subscription,
    its queue) when a pending ``receive`` on it is cancelled. So a :meth:`get` that is
    cancelled while it waits ends the inbox (its reader is going away), and :meth:`close`
    cancels the receive that is waiting, or starts one to cancel: every inbox is released
    exactly once, whoever stops reading it and why.
    """

    def __init__(self, layer: ChannelLayer) -> None:
        self.layer = layer
        self.name = ""
        self._pending: asyncio.Future[dict[str, Any]] | None = None  # started by ready()
        self._getter: asyncio.Task[Any] | None = None  # the task waiting in get()
        self._got: asyncio.Future[None] | None = None  # close() waits for that get to end
        self._released = False  # a cancelled receive gave the channel back
        self._closing: asyncio.Future[None] | None = None
        self.closed = False

    async def open(self, prefix: str) -> str:
        """Create the channel; its name."""
        self.name = await self.layer.new_channel(prefix)
        return self.name

    async def get(self) -> dict[str, Any]:
        """The next message. Awaits the layer's ``receive`` itself (a task of its own and a
        wait around it cost a worker a sixth of its CPU per delivered chunk); cancelled
        meanwhile, the layer lets go of the channel and a message it held is dropped, as
        :meth:`close` would."""
        if self._pending is not None:  # a receive started by ready(): collect it
            await asyncio.wait([self._pending])
            pending, self._pending = self._pending, None
            return pending.result()
        if self.closed:
            raise RuntimeError(f"inbox {self.name} is closed")
        self._getter = asyncio.current_task()
        try:
            return await self.layer.receive(self.name)
        except asyncio.CancelledError:
            self._released = True
            raise
        finally:
            self._getter = None
            if self._got is not None:
                self._got.set_result(None)

    def ready(self) -> asyncio.Future[dict[str, Any]]:
        """The pending receive, started if need be (for ``asyncio.wait`` with other futures);
        collect its message with :meth:`get`."""
        if self._pending is None:
            self._pending = asyncio.ensure_future(self.layer.receive(self.name))
        return self._pending

    async def close(self) -> None:
        """Release the channel (once, whoever asks and even if they are cancelled meanwhile);
        an unread message is dropped with a log line."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        self.closed = True
        getter = self._getter
        if getter is not None and getter is not asyncio.current_task():
            # A get waits in another task: cancelling that receive gives the channel back
            # (and the task, as any task cancelled in a get, goes away).
            self._got = asyncio.get_running_loop().create_future()
            getter.cancel()
            await self._got
        if not self.name or self._released:
            return
        receiver = self._pending
        self._pending = None
        if receiver is None:
            receiver = asyncio.ensure_future(self.layer.receive(self.name))
            await asyncio.sleep(0)  # let it reach the layer's wait, which cancelling cleans up
        receiver.cancel()
        try:
            message = await receiver
        except asyncio.CancelledError:
            pass  # the receive was cancelled: the layer let go of the channel
        except Exception:
            logger.exception("releasing channel %s failed", self.name)
        else:  # it had a message already: the layer still holds the channel
            logger.info("channel %s closed with an unread %s", self.name, message.get("type"))
            await self._drain()

    async def _drain(self) -> None:
        for _ in range(1000):
            receiver = asyncio.ensure_future(self.layer.receive(self.name))
            await asyncio.sleep(0)
            if not receiver.done():
                receiver.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await receiver
                return
            await receiver
