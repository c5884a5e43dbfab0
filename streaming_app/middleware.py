"""ASGI middleware for the streaming routes: a backend that fails before we answer.

Channels' session and auth middleware read the database before any consumer runs; when the
database (or Redis) is unreachable there, the server would answer HTTP 500 to the WebSocket
handshake and to Server-Sent Events. :class:`BackendErrorMiddleware` answers as the README
promises instead: the socket is accepted, gets an ``error`` frame and close code 4503 (come
back later with ``last_seq``); an HTTP request gets a JSON 503.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from .exceptions import GMIError, GMIErrorCode, is_backend_error
from .protocol import CloseCode, ServerFrame, frame

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ANSWERS = ("websocket.accept", "websocket.close", "http.response.start")


class BackendErrorMiddleware:
    """Wrap the outermost app of a streaming route: a backend failure raised before the app
    answered becomes 4503 (WebSocket) or a JSON 503 (HTTP); anything else is re-raised."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        answered = False

        async def watching_send(message: dict[str, Any]) -> None:
            nonlocal answered
            answered = answered or message["type"] in ANSWERS
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        except Exception as exc:
            if answered or scope["type"] not in ("http", "websocket") or not is_backend_error(exc):
                raise
            logger.error("%s %s: streaming backend failed before the answer: %s: %s",
                         scope["type"], scope.get("path", ""), type(exc).__name__, exc)  # fmt: skip
            error = GMIError(GMIErrorCode.BACKEND_UNAVAILABLE, "streaming backend failed")
            if scope["type"] == "websocket":
                await send({"type": "websocket.accept"})
                await send({"type": "websocket.send", "text": frame(
                    ServerFrame.ERROR, code=str(error.code), message=error.message)})  # fmt: skip
                await send({"type": "websocket.close", "code": int(CloseCode.UNAVAILABLE)})
            else:
                await send({"type": "http.response.start", "status": int(error.http_status),
                            "headers": [(b"content-type", b"application/json"),
                                        (b"retry-after", b"5")]})  # fmt: skip
                await send({"type": "http.response.body",
                            "body": json.dumps(error.to_dict()).encode()})  # fmt: skip
