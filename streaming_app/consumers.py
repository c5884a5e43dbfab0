"""The WebSocket transport: one socket per stream, ``ws/streams/<stream_id>/?last_seq=N``.

The consumer is a :class:`~streaming_app.clients.Follower`: it authorises and subscribes, and
the Follower's one event handler turns stream events into frames. It never crashes on bad
input: each refusal is an ``error`` frame and, where the socket cannot go on, a close code of
its own. Whatever ends it, its client is released (``__call__``'s ``finally``).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs

from channels.consumer import get_handler_name
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer

from .auth import authorize_cancel
from .clients import Follower, utf8_len
from .conf import app_settings
from .exceptions import GMIError, GMIErrorCode, StreamError
from .manager import get_streaming_manager
from .protocol import ClientFrame, CloseCode, ServerFrame, frame

logger = logging.getLogger(__name__)

MAX_SEQ = 2**63 - 1  # sequence numbers are signed 64-bit everywhere they are stored


def parse_seq(text: str, stream_id: str, name: str = "last_seq") -> int:
    """One sequence number as a client sent it: ASCII digits only, 0..2**63-1.

    Raises ``StreamError(INVALID_ARGUMENT)`` for anything else (signs, spaces inside,
    escapes, ``&``...), naming ``name``.
    """
    digits = text.strip()
    seq = int(digits) if digits.isascii() and digits.isdigit() and len(digits) <= 19 else -1
    if not 0 <= seq <= MAX_SEQ:
        raise StreamError(
            GMIErrorCode.INVALID_ARGUMENT,
            f"{name} must be an integer from 0 to {MAX_SEQ}, not {text[:40]!r}",
            stream_id=stream_id,
        )
    return seq


Query = bytes | str | Mapping[str, list[str]]


def parse_query(query: Query) -> Mapping[str, list[str]]:
    """A query string's values by name (blank values kept), parsed once for the parsers below;
    a mapping is returned as it is."""
    if isinstance(query, Mapping):
        return query
    if isinstance(query, bytes):
        query = query.decode("latin-1")
    return parse_qs(query, keep_blank_values=True)


def parse_last_seq(query: Query, stream_id: str) -> int:
    """``last_seq`` from a query string, 0 when absent (or blank).

    Raises ``StreamError(INVALID_ARGUMENT)`` for anything but an integer in 0..2**63-1.
    """
    values = [value for value in parse_query(query).get("last_seq", ()) if value]
    if not values:
        return 0
    return parse_seq(values[-1], stream_id)


def parse_flag(query: Query, name: str, stream_id: str) -> bool:
    """A ``name=1`` / ``name=0`` switch of a query string, False when absent.

    Raises ``StreamError(INVALID_ARGUMENT)`` for any other value.
    """
    values = parse_query(query).get(name)
    if not values:
        return False
    if values[-1] not in ("0", "1"):
        message = f"{name} must be 1 or 0, not {values[-1][:40]!r}"
        raise StreamError(GMIErrorCode.INVALID_ARGUMENT, message, stream_id=stream_id)
    return values[-1] == "1"


def parse_replay(query: Query, stream_id: str) -> bool:
    """Whether the query asks for the missed chunks themselves (``replay=chunks``) rather than
    a snapshot (``replay=snapshot``, the default). Raises ``StreamError(INVALID_ARGUMENT)``."""
    values = parse_query(query).get("replay")
    if not values or values[-1] == "snapshot":
        return False
    if values[-1] != "chunks":
        message = f"replay must be 'chunks' or 'snapshot', not {values[-1][:40]!r}"
        raise StreamError(GMIErrorCode.INVALID_ARGUMENT, message, stream_id=stream_id)
    return True


class StreamConsumer(Follower, AsyncWebsocketConsumer):
    """A browser (or any WebSocket peer) following one stream."""

    transport = "websocket"
    uses_hub = True

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:  # a close, the peer leaving, a cancel, a bug: the client is released
            await self.release()

    # -- the transport ----------------------------------------------------------------

    async def write(self, kind: ServerFrame, text: str, seq: int | None) -> None:
        await self.send(text_data=text)
        self.sent_bytes += utf8_len(text)

    async def close_transport(self, code: int) -> None:
        self.ended = True
        await self.close(code=int(code))

    # -- connection -----------------------------------------------------------------

    async def connect(self) -> None:
        self.stream_id = self.scope["url_route"]["kwargs"]["stream_id"]
        self.client_id = f"ws-{uuid.uuid4().hex}"
        await self.accept()
        query = parse_query(self.scope.get("query_string", b""))
        try:
            last_seq = parse_last_seq(query, self.stream_id)
            self.acking = parse_flag(query, "ack", self.stream_id)
            self.replay_chunks = parse_replay(query, self.stream_id)
        except StreamError as exc:
            await self.refuse(exc)
            return
        await self.subscribe(get_streaming_manager(), last_seq)

    async def dispatch(self, message: dict[str, Any]) -> None:
        """Run one handler. A backend failure closes the socket with 4503 (reconnect with
        last_seq), a bug with 4500 (logged with its traceback); neither leaves the client
        behind. No message pays Channels' per-message database clean-up (a thread hop): the
        consumer's database work all runs in ``database_sync_to_async``, which cleans up
        around each call itself, and stream events touch no database."""
        await self.finish_writing()
        self._busy = True  # the hub leaves this client's events in its mailbox meanwhile
        try:
            if message["type"].startswith("stream."):
                await self.dispatch_event(message)
            else:
                handler = getattr(self, get_handler_name(message), None)
                if handler is None:
                    raise ValueError(f"No handler for message type {message['type']}")
                await handler(message)
            await self.empty_mailbox()
        except StopConsumer:
            raise
        except Exception as exc:
            await self.crashed(exc)
        finally:
            self._busy = False

    async def websocket_disconnect(self, message: dict[str, Any]) -> None:
        """Channels' own, without its database clean-up (a thread hop, for the reason given
        in :meth:`dispatch`) and the ``groups`` it leaves (we have none)."""
        await self.disconnect(message["code"])
        raise StopConsumer()

    async def disconnect(self, code: int) -> None:
        self.ended = True  # the peer is gone: nothing more can be sent
        await self.release()

    # -- client frames --------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        size = len(text_data.encode()) if text_data is not None else len(bytes_data or b"")
        if size > app_settings.MAX_CLIENT_FRAME_BYTES:
            limit = app_settings.MAX_CLIENT_FRAME_BYTES
            await self.fail("frame_too_big", f"frames are limited to {limit} bytes",
                            CloseCode.MESSAGE_TOO_BIG)  # fmt: skip
            return
        try:
            message = json.loads(text_data) if text_data is not None else None
        except (ValueError, RecursionError):  # not JSON, or nested too deep to parse
            message = None
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == ClientFrame.ACK and self.delivery is not None:
            assert isinstance(message, dict)
            seq = message.get("seq")
            try:
                if isinstance(seq, bool) or not isinstance(seq, int):
                    message = "an ack's seq must be an integer"
                    raise StreamError(GMIErrorCode.INVALID_ARGUMENT, message,
                                      stream_id=self.stream_id)  # fmt: skip
                await self.acked(seq)
            except StreamError as exc:
                await self.send(text_data=frame(ServerFrame.ERROR, code="bad_frame",
                                                message=exc.message))  # fmt: skip
        elif kind == ClientFrame.PING:
            await self.send(text_data=frame(ServerFrame.PONG))
        elif kind == ClientFrame.CANCEL and self.registered:
            await self.cancel()
        else:
            await self.send(text_data=frame(
                ServerFrame.ERROR, code="bad_frame",
                message="expected a JSON object with type 'ack', 'ping' or 'cancel'",
            ))  # fmt: skip

    async def cancel(self) -> None:
        try:
            await authorize_cancel(self.scope, self.stream_id)
            await get_streaming_manager().close_stream(self.stream_id, "cancelled")
        except GMIError as exc:
            if exc.code is GMIErrorCode.BACKEND_UNAVAILABLE:
                raise
            await self.send(text_data=frame(ServerFrame.ERROR, code=str(exc.code),
                                            message=exc.message))  # fmt: skip


class NoSuchPath(AsyncWebsocketConsumer):
    """Any other WebSocket path: refused with 4404 instead of the server's HTTP 500."""

    async def connect(self) -> None:
        await self.accept()
        code = str(GMIErrorCode.RESOURCE_NOT_FOUND)
        await self.send(text_data=frame(ServerFrame.ERROR, code=code, message="no such path"))
        await self.close(code=int(CloseCode.NOT_FOUND))
