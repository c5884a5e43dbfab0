"""The WebSocket transport: one socket per stream, ``ws/streams/<stream_id>/?last_seq=N``.

The consumer authorises, registers itself with the manager as a ``ChannelClient`` and turns
stream events into frames (see ``protocol``). It never crashes on bad input: each refusal is an
``error`` frame and, where the socket cannot go on, a close code of its own.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any
from urllib.parse import parse_qs

from channels.generic.websocket import AsyncWebsocketConsumer

from .auth import authorize_cancel, authorize_subscribe
from .chunks import AgentOSResponse
from .clients import Chunk, Delivery, Follower, Gap
from .conf import app_settings
from .exceptions import GMIError, GMIErrorCode, StreamError
from .layers import CHUNK
from .manager import get_streaming_manager
from .protocol import ClientFrame, CloseCode, ServerFrame, frame

logger = logging.getLogger(__name__)

CLOSE_CODE_FOR_ERROR: dict[GMIErrorCode, CloseCode] = {
    GMIErrorCode.INVALID_ARGUMENT: CloseCode.BAD_REQUEST,
    GMIErrorCode.RESOURCE_NOT_FOUND: CloseCode.NOT_FOUND,
    GMIErrorCode.STREAM_CLOSED: CloseCode.STREAM_GONE,
    GMIErrorCode.PERMISSION_DENIED: CloseCode.FORBIDDEN,
    GMIErrorCode.RATE_LIMIT_EXCEEDED: CloseCode.STREAM_FULL,
}


def parse_last_seq(query_string: bytes | str, stream_id: str) -> int:
    """``last_seq`` from a query string, 0 when absent.

    Raises ``StreamError(INVALID_ARGUMENT)`` for anything but a non-negative integer.
    """
    if isinstance(query_string, bytes):
        query_string = query_string.decode("latin-1")
    values = parse_qs(query_string).get("last_seq")
    if not values:
        return 0
    try:
        last_seq = int(values[-1])
    except ValueError:
        last_seq = -1
    if last_seq < 0:
        raise StreamError(
            GMIErrorCode.INVALID_ARGUMENT,
            f"last_seq must be a non-negative integer, not {values[-1]!r}",
            stream_id=stream_id,
        )
    return last_seq


class StreamConsumer(Follower, AsyncWebsocketConsumer):
    """A browser (or any WebSocket peer) following one stream."""

    transport = "websocket"
    registered = False
    closing = False

    # -- StreamClient ---------------------------------------------------------------

    def is_active(self) -> bool:
        return not self.closing

    async def send_chunk(self, chunk: AgentOSResponse) -> None:
        """Send one chunk outside the stream's sequence (``seq`` is null)."""
        await self.send(text_data=self.out_of_band_frame(chunk))

    async def notify_stream_closed(self, reason: str | None = None) -> None:
        await self.send(text_data=self.closed_frame(reason))

    # -- connection -----------------------------------------------------------------

    async def connect(self) -> None:
        self.stream_id: str = self.scope["url_route"]["kwargs"]["stream_id"]
        self.client_id: str = f"ws-{uuid.uuid4().hex}"
        self.closing = False
        await self.accept()
        try:
            last_seq = parse_last_seq(self.scope.get("query_string", b""), self.stream_id)
            manager = get_streaming_manager()
            stream = await authorize_subscribe(self.scope, self.stream_id)
            self.delivery = Delivery(manager.history, self.stream_id, last_seq)
            if not stream.is_active:
                await self.replay_closed(stream.close_reason)
                return
            await manager.register_client(self.stream_id, self)
        except GMIError as exc:
            if exc.code is GMIErrorCode.STREAM_CLOSED and self.delivery is not None:
                await self.replay_closed(exc.details.get("reason", ""))
            else:
                await self.refuse(exc)
            return
        self.registered = True
        try:
            items = await self.delivery.catch_up()
        except Exception as exc:
            await self.backend_failed(exc)
            return
        await self.send(text_data=frame(
            ServerFrame.SUBSCRIBED, stream_id=self.stream_id, client_id=self.client_id,
            seq=self.delivery.delivered_seq,
        ))  # fmt: skip
        await self.emit(items)

    async def dispatch(self, message: dict[str, Any]) -> None:
        """Serve stream events; a failing backend closes with 4503 (reconnect with last_seq)
        instead of crashing the consumer. Chunks skip Channels' per-message database
        clean-up: they touch no database."""
        kind = message["type"]
        if not kind.startswith("stream."):
            await super().dispatch(message)
            return
        try:
            if kind == CHUNK:
                await self.stream_chunk(message)
            else:
                await super().dispatch(message)
        except Exception as exc:
            await self.backend_failed(exc)

    async def backend_failed(self, exc: Exception) -> None:
        logger.error(
            "client %s of stream %s: streaming backend failed: %s: %s",
            self.client_id, self.stream_id, type(exc).__name__, exc,
        )  # fmt: skip
        if self.closing:
            return
        await self.send_error(str(GMIErrorCode.BACKEND_UNAVAILABLE), "streaming backend failed")
        await self.close_with(CloseCode.UNAVAILABLE)

    async def disconnect(self, code: int) -> None:
        self.closing = True
        await self.leave()

    async def leave(self) -> None:
        """Deregister from the manager once (on our close or the peer's)."""
        if not self.registered:
            return
        self.registered = False
        try:
            await get_streaming_manager().client_gone(self.stream_id, self.client_id)
        except GMIError:
            logger.exception("client %s of stream %s: deregistration failed",
                             self.client_id, self.stream_id)  # fmt: skip

    async def replay_closed(self, reason: str) -> None:
        """A closed stream: what the client missed (while history holds it), then ``closed``
        and close code 4410."""
        assert self.delivery is not None
        try:
            await self.emit(await self.delivery.catch_up())
        except Exception as exc:
            await self.backend_failed(exc)
            return
        await self.notify_stream_closed(reason)
        await self.close_with(CloseCode.STREAM_GONE)

    async def refuse(self, exc: GMIError) -> None:
        """Tell the peer why it cannot follow the stream, then close with the matching code."""
        code = CLOSE_CODE_FOR_ERROR.get(exc.code, CloseCode.UNAVAILABLE)
        logger.info("client %s refused on stream %s: %s", self.client_id, self.stream_id, exc)
        await self.send(text_data=frame(ServerFrame.ERROR, code=str(exc.code), message=exc.message))
        await self.close_with(code)

    async def close_with(self, code: int) -> None:
        self.closing = True
        await self.leave()
        await self.close(code=int(code))

    # -- client frames --------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        size = len(text_data.encode()) if text_data is not None else len(bytes_data or b"")
        if size > app_settings.MAX_CLIENT_FRAME_BYTES:
            limit = app_settings.MAX_CLIENT_FRAME_BYTES
            await self.send_error("frame_too_big", f"frames are limited to {limit} bytes")
            await self.close_with(CloseCode.MESSAGE_TOO_BIG)
            return
        try:
            message = json.loads(text_data) if text_data is not None else None
        except ValueError:
            message = None
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == ClientFrame.PING:
            await self.send(text_data=frame(ServerFrame.PONG))
        elif kind == ClientFrame.CANCEL and self.registered:
            await self.cancel()
        else:
            await self.send_error(
                "bad_frame", "expected a JSON object with type 'ping' or 'cancel'"
            )

    async def cancel(self) -> None:
        try:
            await authorize_cancel(self.scope, self.stream_id)
            await get_streaming_manager().close_stream(self.stream_id, "cancelled")
        except GMIError as exc:
            await self.send_error(str(exc.code), exc.message)

    async def send_error(self, code: str, message: str) -> None:
        await self.send(text_data=frame(ServerFrame.ERROR, code=code, message=message))

    # -- stream events (named after the event type) ---------------------------------

    async def stream_chunk(self, event: dict[str, Any]) -> None:
        if self.delivery is None or self.closing:
            return
        await self.emit(await self.delivery.receive(event["seq"], event["chunk"]))

    async def stream_closed(self, event: dict[str, Any]) -> None:
        if self.delivery is None or self.closing:
            return
        await self.emit(await self.delivery.catch_up(event["last_seq"]))
        code = event.get("code", CloseCode.STREAM_CLOSED)
        if code == CloseCode.SERVICE_RESTART:
            await self.send_reconnect(event["reason"])
        else:
            await self.notify_stream_closed(event["reason"])
        await self.close_with(code)

    async def stream_sync(self, event: dict[str, Any]) -> None:
        """The sweeper saw us behind the head or open on a closed stream: catch up."""
        if event["closed"]:
            await self.stream_closed({"last_seq": event["head_seq"], "reason": event["reason"]})
        elif self.delivery is not None and not self.closing:
            await self.emit(await self.delivery.catch_up(event["head_seq"]))

    async def stream_deregistered(self, event: dict[str, Any]) -> None:
        if self.closing:
            return
        self.registered = False  # the manager has already removed us
        code = event.get("code", CloseCode.DEREGISTERED)
        if code == CloseCode.SERVICE_RESTART:
            await self.send_reconnect(event["reason"])
        else:
            await self.notify_stream_closed(event["reason"])
        await self.close_with(code)

    async def send_reconnect(self, reason: str) -> None:
        """Tell the client to come back later from where it is."""
        await self.send(text_data=self.reconnect_frame(reason))

    async def emit(self, items: list[Chunk | Gap]) -> None:
        """Send chunk and gap frames; a failed send goes to the manager's send-error policy."""
        for _kind, _seq, text in self.item_frames(items):
            try:
                await self.send(text_data=text)
            except Exception as exc:
                await get_streaming_manager().report_send_failure(
                    self.stream_id, self.client_id, exc
                )
                return
