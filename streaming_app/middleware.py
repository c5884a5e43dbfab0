"""ASGI middleware: a backend that fails before the streaming code could answer still gets the
documented answer.

Channels' ``AuthMiddlewareStack`` reads the session and the user from the database before a
consumer runs, so with the database unreachable a WebSocket handshake or an SSE request used to
end in a bare HTTP 500. Wrap the streaming routes in :class:`BackendErrorMiddleware`
(outermost) and a backend failure (database, Redis) before the socket was accepted or the
response started becomes what the README promises: an ``error`` frame
``{"type": "error", "code": "BACKEND_UNAVAILABLE", ...}`` and close code 4503 on a WebSocket,
a JSON 503 (``GMIError.to_dict()``) over HTTP. Clients retry later.

:func:`StreamingAuthMiddlewareStack` is Channels' ``AuthMiddlewareStack`` without the cost
it adds to every frame of a WebSocket (see :class:`StreamingSessionMiddleware`).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from channels.auth import AuthMiddleware, get_user
from channels.sessions import CookieMiddleware, InstanceSessionWrapper, SessionMiddleware

from .exceptions import GMIError, GMIErrorCode, is_backend_error
from .protocol import CloseCode, ServerFrame, frame
from .registry import gathered

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MESSAGE = "streaming backend failed"  # the same words as the consumers' own 4503 frame

# What the wrapped app sends first to answer: from then on the answer is its own.
ANSWERS = {
    "websocket": {"websocket.accept", "websocket.close", "websocket.http.response.start"},
    "http": {"http.response.start"},
}
WEBSOCKET_ENDS = {"websocket.close", "websocket.http.response.start"}
REFUSALS = {"websocket": "close code 4503", "http": "HTTP 503"}


class BackendErrorMiddleware:
    """Answers 4503 (accept, ``error`` frame, close) or a JSON 503 when the wrapped app fails
    with a backend error before it answered; logs it with the path.

    After the app answered, a backend error is logged and re-raised (the server ends the
    connection); a socket still open is first closed with the ``error`` frame and 4503. Any
    other exception passes through untouched.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        answers = ANSWERS.get(kind)
        if answers is None:  # lifespan, or anything else: not ours
            await self.app(scope, receive, send)
            return
        sent: set[str] = set()

        async def tracking_send(message: Message) -> None:
            await send(message)
            sent.add(message["type"])

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if not is_backend_error(exc):
                raise
            answered = bool(sent & answers)
            outcome = "after the answer started" if answered else f"answered {REFUSALS[kind]}"
            logger.error("%s %s: streaming backend failed (%s): %s: %s", kind,
                         scope.get("path", ""), outcome, type(exc).__name__, exc)  # fmt: skip
            if not answered:
                if kind == "websocket":
                    await self.close_websocket(send, accepted=False)
                else:
                    await self.answer_http(send)
                return
            if kind == "websocket" and not sent & WEBSOCKET_ENDS:
                # Still open: the documented close rather than the server's 1011.
                with contextlib.suppress(Exception):  # the peer may be gone already
                    await self.close_websocket(send, accepted=True)
            raise

    @staticmethod
    async def close_websocket(send: Send, *, accepted: bool) -> None:
        """Accept (unless done), then the ``error`` frame and close code 4503."""
        if not accepted:
            await send({"type": "websocket.accept"})
        text = frame(ServerFrame.ERROR, code=str(GMIErrorCode.BACKEND_UNAVAILABLE), message=MESSAGE)
        await send({"type": "websocket.send", "text": text})
        await send({"type": "websocket.close", "code": int(CloseCode.UNAVAILABLE)})

    @staticmethod
    async def answer_http(send: Send) -> None:
        """A 503 with the error as JSON (``GMIError.to_dict()``)."""
        error = GMIError(GMIErrorCode.BACKEND_UNAVAILABLE, MESSAGE)
        await send({"type": "http.response.start", "status": int(error.http_status),
                    "headers": [(b"content-type", b"application/json"),
                                (b"retry-after", b"5")]})  # fmt: skip
        await send({"type": "http.response.body", "body": json.dumps(error.to_dict()).encode()})


class StreamingSessionMiddleware(SessionMiddleware):  # type: ignore[misc]
    """Channels' ``SessionMiddleware``, except that a WebSocket's frames do not go through its
    send wrapper. The wrapper saves a modified session on ``http.response.start`` only, which a
    WebSocket never sends, yet it read the lazy session twice for every frame written (about a
    tenth of a worker's CPU per delivered chunk). HTTP (Server-Sent Events) keeps it."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        wrapper = InstanceSessionWrapper(scope, send)
        await wrapper.resolve_session()
        await self.inner(
            wrapper.scope, receive, send if scope["type"] == "websocket" else wrapper.send
        )


class StreamingAuthMiddleware(AuthMiddleware):  # type: ignore[misc]
    """Channels' ``AuthMiddleware`` (the same ``scope["user"]``, resolved before the app
    runs), whose lookup of the user shares the database thread's trips with the registrations
    and removals of clients (:class:`~streaming_app.registry.Gathered`): in a connect storm,
    one thread hop serves several sockets instead of two hops each."""

    async def resolve_scope(self, scope: Scope) -> None:
        if getattr(scope.get("session"), "session_key", None) is None:
            # No session key (no cookie, or one no session has): the user is anonymous, and
            # Django's own lookup finds that out without a query, so no trip.
            scope["user"]._wrapped = get_user.func(scope)
            return
        scope["user"]._wrapped = await gathered(lambda: get_user.func(scope))


def StreamingAuthMiddlewareStack(inner: ASGIApp) -> ASGIApp:
    """Cookies, session and user in the scope, as Channels' ``AuthMiddlewareStack`` puts them
    there, without the session's per-frame send wrapper on WebSockets and with the user's
    lookup sharing the database's trips (:class:`StreamingAuthMiddleware`)."""
    return CookieMiddleware(StreamingSessionMiddleware(StreamingAuthMiddleware(inner)))  # type: ignore[no-any-return]
