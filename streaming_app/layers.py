"""How streams talk to Channels: group names, event shapes, and the sends the manager makes.

A stream is the group ``streaming.<stream_id>``. Events:

- ``stream.chunk``        ``{"seq", "chunk"}`` (chunk = its JSON text, encoded once by the producer)
- ``stream.closed``       ``{"reason", "last_seq", "code"}``, also to ``streaming.<id>.control``
- ``stream.deregistered`` ``{"stream_id", "reason", "code"}`` sent to one client's channel
- ``stream.sync``         ``{"head_seq", "closed", "reason"}`` sent by the sweeper to a client
  that fell behind (its channel dropped messages): catch up to ``head_seq``, close if closed
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from channels.exceptions import ChannelFull

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

    async def publish_chunk(self, stream_id: str, seq: int, chunk_json: str) -> None:
        await self._call(stream_id, "group_send", group_name(stream_id), {
            "type": CHUNK, "seq": seq, "chunk": chunk_json,
        })  # fmt: skip

    async def publish_closed(self, stream_id: str, reason: str, last_seq: int, code: int) -> None:
        event = {"type": CLOSED, "reason": reason, "last_seq": last_seq, "code": code}
        await self._call(stream_id, "group_send", group_name(stream_id), event)
        await self._call(stream_id, "group_send", control_group_name(stream_id), event)

    async def tell_deregistered(self, stream_id: str, channel: str, reason: str, code: int) -> None:
        await self._call(stream_id, "send", channel, {
            "type": DEREGISTERED, "stream_id": stream_id, "reason": reason, "code": code,
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
