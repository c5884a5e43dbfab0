"""The Server-Sent Events transport: ``GET /streams/<stream_id>/events``.

The same frames as the WebSocket, each an SSE event named after its ``type``; chunk events
carry ``id: <seq>``, so a browser's ``EventSource`` resumes by itself with ``Last-Event-ID``
(``?last_seq=N`` works too). Refusals are plain HTTP answers with the error's status and JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from typing import Any

from .auth import authorize_subscribe
from .chunks import AgentOSResponse
from .clients import Chunk, Delivery, Follower, Gap
from .conf import app_settings
from .consumers import parse_last_seq
from .exceptions import GMIError, GMIErrorCode, StreamError
from .layers import CHUNK, CLOSED, DEREGISTERED, SYNC
from .manager import get_streaming_manager
from .protocol import CloseCode, ServerFrame, frame

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]


def event(kind: str, data: str, seq: int | None = None) -> bytes:
    """One SSE event."""
    head = f"id: {seq}\n" if seq is not None else ""
    return f"{head}event: {kind}\ndata: {data}\n\n".encode()


class EventStream(Follower):
    """One SSE response following one stream; a ``ChannelClient`` of the manager."""

    transport = "sse"

    def __init__(self, scope: Scope, send: Any) -> None:
        self.scope = scope
        self._send = send
        self.stream_id: str = scope["url_route"]["kwargs"]["stream_id"]
        self.client_id = f"sse-{uuid.uuid4().hex}"
        self.channel_name = ""
        self.delivery: Delivery | None = None
        self.finished = False

    # -- StreamClient ---------------------------------------------------------------

    def is_active(self) -> bool:
        return not self.finished

    async def send_chunk(self, chunk: AgentOSResponse) -> None:
        await self.write(event("chunk", self.out_of_band_frame(chunk)))

    async def notify_stream_closed(self, reason: str | None = None) -> None:
        await self.write(event("closed", self.closed_frame(reason)))

    # -- the response ---------------------------------------------------------------

    async def write(self, body: bytes, *, more: bool = True) -> None:
        await self._send({"type": "http.response.body", "body": body, "more_body": more})

    async def refuse(self, exc: GMIError) -> None:
        body = json.dumps(exc.to_dict()).encode()
        await self._send({"type": "http.response.start", "status": int(exc.http_status),
                          "headers": [(b"content-type", b"application/json")]})  # fmt: skip
        await self.write(body, more=False)
        self.finished = True

    async def run(self, receive: Any) -> None:
        """Authorise, register, stream until the stream ends or the client goes."""
        manager = get_streaming_manager()
        try:
            headers = dict(self.scope.get("headers", []))
            last_event_id = headers.get(b"last-event-id", b"").decode("latin-1").strip()
            query = f"last_seq={last_event_id}" if last_event_id else self.scope["query_string"]
            last_seq = parse_last_seq(query, self.stream_id)
            stream = await authorize_subscribe(self.scope, self.stream_id)
            self.delivery = Delivery(manager.history, self.stream_id, last_seq)
            if stream.is_active:
                self.channel_name = await manager.layer.layer.new_channel("streaming.sse.")
                await manager.register_client(self.stream_id, self)
        except StreamError as exc:
            if exc.code is not GMIErrorCode.STREAM_CLOSED or self.delivery is None:
                await self.refuse(exc)
                return
            stream.close_reason = exc.details.get("reason", "")
            stream.status = stream.Status.CLOSED
        except GMIError as exc:
            await self.refuse(exc)
            return
        await self._send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]})  # fmt: skip
        if not stream.is_active:  # what the client missed, then closed
            await self.emit(await self.delivery.catch_up())
            await self.notify_stream_closed(stream.close_reason)
            await self.finish()
            return
        try:
            items = await self.delivery.catch_up()
            await self.write(event("subscribed", frame(
                ServerFrame.SUBSCRIBED, stream_id=self.stream_id, client_id=self.client_id,
                seq=self.delivery.delivered_seq,
            )))  # fmt: skip
            await self.emit(items)
            await self.follow(receive, manager.layer.layer)
        except Exception as exc:
            logger.error("SSE client %s of stream %s failed: %s", self.client_id,
                         self.stream_id, exc)  # fmt: skip
            await self.write(event("error", frame(ServerFrame.ERROR,
                                                  code=str(GMIErrorCode.BACKEND_UNAVAILABLE),
                                                  message="streaming backend failed")))  # fmt: skip
        finally:
            if not self.finished:
                await self.finish()
            with contextlib.suppress(GMIError):
                await manager.client_gone(self.stream_id, self.client_id)

    async def follow(self, receive: Any, layer: Any) -> None:
        """Serve stream events until the stream ends or the client disconnects."""
        gone = asyncio.ensure_future(receive())
        incoming = asyncio.ensure_future(layer.receive(self.channel_name))
        try:
            while not self.finished:
                done, _ = await asyncio.wait(
                    {gone, incoming}, timeout=app_settings.SSE_KEEPALIVE_SECONDS,
                    return_when=asyncio.FIRST_COMPLETED,
                )  # fmt: skip
                if gone in done:
                    self.finished = True  # http.disconnect: the client went away
                    return
                if incoming in done:
                    await self.on_event(incoming.result())
                    incoming = asyncio.ensure_future(layer.receive(self.channel_name))
                else:
                    await self.write(b": keep-alive\n\n")
        finally:
            for task in (gone, incoming):
                task.cancel()

    async def on_event(self, message: Message) -> None:
        assert self.delivery is not None
        kind = message["type"]
        if kind == CHUNK:
            await self.emit(await self.delivery.receive(message["seq"], message["chunk"]))
        elif kind in (CLOSED, SYNC):
            last = message["last_seq"] if kind == CLOSED else message["head_seq"]
            await self.emit(await self.delivery.catch_up(last))
            if kind == CLOSED or message["closed"]:
                await self.end(message.get("code", CloseCode.STREAM_CLOSED), message["reason"])
        elif kind == DEREGISTERED:
            await self.end(message["code"], message["reason"])

    async def end(self, code: int, reason: str) -> None:
        if code == CloseCode.SERVICE_RESTART:
            await self.write(event("reconnect", self.reconnect_frame(reason)))
        else:
            await self.notify_stream_closed(reason)
        await self.finish()

    async def emit(self, items: list[Chunk | Gap]) -> None:
        for kind, seq, text in self.item_frames(items):
            await self.write(event(kind, text, seq))

    async def finish(self) -> None:
        self.finished = True
        await self.write(b"", more=False)


async def stream_events(scope: Scope, receive: Any, send: Any) -> None:
    """The ASGI app of the SSE endpoint (route it with ``sse_urlpatterns``)."""
    if scope["method"] not in ("GET", "HEAD"):
        await send({"type": "http.response.start", "status": 405,
                    "headers": [(b"allow", b"GET")]})  # fmt: skip
        await send({"type": "http.response.body", "body": b""})
        return
    while True:  # a GET has no body to speak of; read it so receive() next says "disconnect"
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            break
    if message["type"] == "http.disconnect":
        return
    await EventStream(scope, send).run(receive)
