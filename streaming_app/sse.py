"""The Server-Sent Events transport: ``GET /streams/<stream_id>/events``.

The same frames as the WebSocket, each an SSE event named after its ``type``; chunk events
carry ``id: <seq>``, so a browser's ``EventSource`` resumes by itself with ``Last-Event-ID``
(``?last_seq=N`` works too). Refusals are plain HTTP answers with the error's status and JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

from django.http.request import split_domain_port, validate_host

from .clients import Follower
from .conf import app_settings
from .consumers import parse_last_seq, parse_query, parse_replay, parse_seq
from .exceptions import GMIError, GMIErrorCode, StreamError, is_backend_error
from .layers import Inbox
from .manager import StreamingManager, get_streaming_manager
from .protocol import ServerFrame

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]


def event(kind: str, data: str, seq: int | None = None) -> bytes:
    """One SSE event."""
    head = f"id: {seq}\n" if seq is not None else ""
    return f"{head}event: {kind}\ndata: {data}\n\n".encode()


class EventStream(Follower):
    """One SSE response following one stream: a Follower whose frames are SSE events.

    There is no acknowledgement in SSE, so a failed write (the peer went away mid-stream) goes
    to the send-error policy like a WebSocket's.
    """

    transport = "sse"
    response_headers: tuple[tuple[bytes, bytes], ...] = (
        (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
        (b"x-accel-buffering", b"no"),
    )  # fmt: skip

    def __init__(self, scope: Scope, send: Any) -> None:
        self.scope = scope
        self._send = send
        self.stream_id = scope["url_route"]["kwargs"]["stream_id"]
        self.client_id = f"sse-{uuid.uuid4().hex}"
        self.started = False  # the 200 and its headers went out
        self.finished = False  # the body is complete
        self.inbox: Inbox | None = None

    # -- the transport ----------------------------------------------------------------

    async def write(self, kind: ServerFrame, text: str, seq: int | None) -> None:
        await self.write_body(event(str(kind), text, seq))

    async def write_body(self, body: bytes) -> None:
        if self.finished:
            raise ConnectionError("the response is complete")
        if not self.started:
            self.started = True
            await self._send({"type": "http.response.start", "status": 200,
                              "headers": list(self.response_headers)})  # fmt: skip
        await self._send({"type": "http.response.body", "body": body, "more_body": True})
        self.sent_bytes += len(body)

    async def close_transport(self, code: int) -> None:
        self.ended = True
        if self.finished:
            return
        if not self.started:  # nothing was written: an empty 200
            await self.write_body(b"")
        self.finished = True
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    async def refuse(self, exc: GMIError) -> None:
        """Before anything was written: an HTTP answer with the error's status and JSON."""
        if self.started:
            await super().refuse(exc)
            return
        self.log_refusal(exc)
        self.ended = self.started = self.finished = True
        await self._send({"type": "http.response.start", "status": int(exc.http_status),
                          "headers": [(b"content-type", b"application/json")]})  # fmt: skip
        await self._send({"type": "http.response.body", "body": json.dumps(exc.to_dict()).encode()})

    async def _release(self) -> None:
        try:
            await super()._release()
        finally:
            if self.inbox is not None:
                await self.inbox.close()

    # -- the response ---------------------------------------------------------------

    async def run(self, receive: Any) -> None:
        """Authorise, register, stream until the stream ends or the client goes."""
        try:
            headers = dict(self.scope.get("headers", []))
            last_event_id = headers.get(b"last-event-id", b"").decode("latin-1")
            query = parse_query(self.scope["query_string"])
            try:
                if last_event_id.strip():  # the browser's resume cursor wins over the query
                    last_seq = parse_seq(last_event_id, self.stream_id, "Last-Event-ID")
                else:
                    last_seq = parse_last_seq(query, self.stream_id)
                self.replay_chunks = parse_replay(query, self.stream_id)
            except StreamError as exc:
                await self.refuse(exc)
                return
            manager = get_streaming_manager()
            self.inbox = Inbox(manager.layer.layer)
            self.channel_name = await self.inbox.open("streaming.sse.")
            if await self.subscribe(manager, last_seq):
                await self.follow(receive, self.inbox)
        except Exception as exc:
            if not self.started:
                if is_backend_error(exc):
                    logger.error("SSE client %s of stream %s: backend failed: %s",
                                 self.client_id, self.stream_id, exc)  # fmt: skip
                    await self.refuse(GMIError(GMIErrorCode.BACKEND_UNAVAILABLE,
                                               "streaming backend failed"))  # fmt: skip
                    return
                raise
            await self.crashed(exc)
        finally:  # whatever ended it, the client is released
            await self.release()

    async def follow(self, receive: Any, inbox: Inbox) -> None:
        """Serve stream events until the stream ends or the client disconnects."""
        gone = asyncio.ensure_future(receive())
        try:
            while not self.ended:
                incoming = inbox.ready()
                done, _ = await asyncio.wait(
                    {gone, incoming}, timeout=app_settings.SSE_KEEPALIVE_SECONDS,
                    return_when=asyncio.FIRST_COMPLETED,
                )  # fmt: skip
                if gone in done:
                    self.ended = True  # http.disconnect: the client went away
                    return
                if incoming in done:
                    await self.dispatch_event(await inbox.get())
                else:
                    try:
                        await self.write_body(b": keep-alive\n\n")
                    except Exception as exc:
                        await self.send_failed(exc)
        finally:
            gone.cancel()


class TranslatedStream(EventStream):
    """An event stream in another protocol (AG-UI, the UI message stream): each frame becomes
    that protocol's events (:meth:`translate`, written by :meth:`encode`). A client that comes
    back with a cursor gets the stream read from its start: the chunks it has only rebuild this
    response's state (:meth:`track`) and are not sent, nor the part of a gap before it."""

    resume_after = 0  # the client has the chunks up to this seq
    snapshots = False  # these protocols have no such frame: their clients get the chunks

    async def subscribe(self, manager: StreamingManager, last_seq: int) -> bool:
        self.resume_after = last_seq
        return await super().subscribe(manager, 0)

    async def write(self, kind: ServerFrame, text: str, seq: int | None) -> None:
        frame = json.loads(text)
        if kind is ServerFrame.CHUNK and seq is not None and seq <= self.resume_after:
            self.track(kind, frame, seq)  # the client has it: state only
            return
        if kind is ServerFrame.GAP:  # only the part of a gap after the client's cursor
            if frame["to_seq"] <= self.resume_after:
                return
            frame["from_seq"] = max(frame["from_seq"], self.resume_after + 1)
        events = self.translate(kind, frame, seq)
        if events:
            await self.write_body(self.encode(events, seq))

    def track(self, kind: ServerFrame, frame: dict[str, Any], seq: int | None) -> None:
        """Fold a frame the client already has into this response's state."""
        raise NotImplementedError

    def translate(self, kind: ServerFrame, frame: dict[str, Any], seq: int | None) -> list[Any]:
        """The protocol's events for one frame (none: nothing is written)."""
        raise NotImplementedError

    def encode(self, events: list[Any], seq: int | None) -> bytes:
        """The SSE text of one frame's events; ``id: <seq>`` goes on the last, so the cursor
        moves once every event of a chunk is in."""
        raise NotImplementedError


async def stream_events(scope: Scope, receive: Any, send: Any) -> None:
    """The ASGI app of the SSE endpoint (route it with ``sse_urlpatterns``)."""
    await serve(EventStream, ("GET", "HEAD"), scope, receive, send)


async def serve(
    stream_class: type[EventStream], methods: tuple[str, ...], scope: Scope, receive: Any,
    send: Any,
) -> None:  # fmt: skip
    """Serve one event-stream response of ``stream_class`` (this module's frames, or another
    protocol's events over the same Follower)."""
    if scope["method"] not in methods:
        await send({"type": "http.response.start", "status": 405,
                    "headers": [(b"allow", ", ".join(methods).encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": b""})
        return
    while True:  # read the request body (a POST's input is not used) so receive() next says
        message = await receive()  # "disconnect" when the client goes
        if message["type"] != "http.request" or not message.get("more_body"):
            break
    if message["type"] == "http.disconnect":
        return
    if not host_allowed(scope):  # routed before Django, so Django's own check never runs
        logger.warning("SSE request for %s refused: Host %r is not in ALLOWED_HOSTS",
                       scope.get("path", ""), request_host(scope))  # fmt: skip
        error = GMIError(GMIErrorCode.INVALID_ARGUMENT, "Invalid Host header")
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json")]})  # fmt: skip
        await send({"type": "http.response.body", "body": json.dumps(error.to_dict()).encode()})
        return
    await stream_class(scope, send).run(receive)


def request_host(scope: Scope) -> str | None:
    """The request's Host header, even empty (or the server's address when it sent none;
    None when there is neither)."""
    for name, value in scope.get("headers", []):
        if name == b"host":
            return str(value.decode("latin-1"))
    server = scope.get("server")
    return f"{server[0]}:{server[1]}" if server else None


def host_allowed(scope: Scope) -> bool:
    """Django's ``ALLOWED_HOSTS`` check, for a route Django does not serve: an empty Host is
    refused, as Django refuses it."""
    host = request_host(scope)
    if host is None:
        return True  # no Host and no server address (an in-process test): nothing to check
    domain, _port = split_domain_port(host)
    return bool(domain) and validate_host(domain, app_settings.allowed_hosts())
