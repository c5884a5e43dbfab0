"""A worker that cannot reach its database answers the documented 4503 / JSON 503, not 500.

Channels' AuthMiddlewareStack reads the session of a browser's cookie from the database before
any streaming code runs: with the database unreachable, that used to be an HTTP 500 for the
WebSocket handshake and for Server-Sent Events. Real parts: a healthy Daphne gives a browser
its session cookie and a stream, then a second Daphne whose database is unreachable serves it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import websockets
from asgiref.sync import sync_to_async
from channels.testing import ApplicationCommunicator
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, get_user_model
from django.contrib.sessions.backends.db import SessionStore
from django.db import OperationalError

from streaming_app.exceptions import GMIError, GMIErrorCode
from streaming_app.middleware import BackendErrorMiddleware, StreamingAuthMiddlewareStack
from streaming_app.protocol import CloseCode
from streaming_app.registry import gathered

from .servers import DaphneServer, base_env, free_port, migrated_sqlite, read_frames
from .test_daphne import start_turn

MESSAGE = "streaming backend failed"  # as in the consumers' own 4503 frame
ERROR_FRAME = {"type": "error", "code": "BACKEND_UNAVAILABLE", "message": MESSAGE}
ERROR_BODY = GMIError(GMIErrorCode.BACKEND_UNAVAILABLE, MESSAGE).to_dict()

# Databases a worker cannot reach, each failing with OperationalError on connect.
UNREACHABLE: dict[str, Callable[[Path], str]] = {
    "sqlite in a missing directory": lambda tmp: f"sqlite:///{tmp}/missing/db.sqlite3",
    "postgresql on a closed port": lambda tmp: (
        f"postgres://streaming:secret@127.0.0.1:{free_port()}/streaming"
    ),
}


async def follow_socket(server: DaphneServer, stream_id: str, cookie: str) -> Any:
    headers = {"Origin": server.http_url, **({"Cookie": cookie} if cookie else {})}
    async with websockets.connect(
        f"{server.ws_url}/ws/streams/{stream_id}/", additional_headers=headers
    ) as ws:
        frames = await asyncio.wait_for(read_frames(ws), 10)
    return frames, ws.close_code


def get_events(server: DaphneServer, stream_id: str, cookie: str) -> tuple[int, str, Any]:
    """Status, content type and JSON body of the SSE endpoint's (refusing) answer."""
    request = urllib.request.Request(
        f"{server.http_url}/streams/{stream_id}/events",
        headers={"Cookie": cookie} if cookie else {},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        body = error.read()
        return error.code, error.headers["Content-Type"], json.loads(body or b"null")


@pytest.mark.parametrize("database", UNREACHABLE)
async def test_a_worker_without_its_database_answers_4503_and_503(
    database: str, tmp_path: Path
) -> None:
    with DaphneServer(
        base_env(DATABASE_URL=migrated_sqlite(tmp_path)), log=tmp_path / "healthy.log"
    ) as healthy:
        stream_id, cookie = await asyncio.to_thread(start_turn, healthy, "hello")
    assert "sessionid=" in cookie
    env = base_env(DATABASE_URL=UNREACHABLE[database](tmp_path))
    with DaphneServer(env, log=tmp_path / "cut-off.log") as server:
        # With the cookie the session lookup fails first (it was HTTP 500); without it, the
        # stream lookup (the streaming code's own 4503 / 503).
        for sent_cookie in (cookie, ""):
            frames, code = await follow_socket(server, stream_id, sent_cookie)
            assert (frames, code) == ([ERROR_FRAME], CloseCode.UNAVAILABLE), server.log()
            answer = await asyncio.to_thread(get_events, server, stream_id, sent_cookie)
            assert answer == (503, "application/json", ERROR_BODY), server.log()
        log = server.log()
    for request in (f"websocket /ws/streams/{stream_id}/", f"http /streams/{stream_id}/events"):
        assert f"streaming_app.middleware {request}: streaming backend failed" in log, log
    assert "OperationalError" in log
    assert "Exception inside application" not in log, log


# -- after the answer started (the wrapped app is a small ASGI app of its own) ---------------


def failing_app(*messages: dict[str, Any], error: Exception) -> Any:
    """An ASGI app that sends ``messages``, then raises ``error``."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        for message in messages:
            await send(message)
        raise error

    return app


def outputs(communicator: ApplicationCommunicator) -> list[dict[str, Any]]:
    """What the finished app sent (``receive_output`` would raise its error instead)."""
    sent = []
    while not communicator.output_queue.empty():
        sent.append(communicator.output_queue.get_nowait())
    return sent


async def test_a_socket_accepted_before_the_failure_is_closed_4503_and_the_error_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = failing_app({"type": "websocket.accept"}, error=OperationalError("database is gone"))
    scope = {"type": "websocket", "path": "/ws/streams/s1/"}
    communicator = ApplicationCommunicator(BackendErrorMiddleware(app), scope)
    with (
        caplog.at_level(logging.ERROR, "streaming_app.middleware"),
        pytest.raises(OperationalError),
    ):
        await communicator.wait(2)
    assert outputs(communicator) == [
        {"type": "websocket.accept"},
        {"type": "websocket.send", "text": json.dumps(ERROR_FRAME, separators=(",", ":"))},
        {"type": "websocket.close", "code": 4503},
    ]
    assert "websocket /ws/streams/s1/" in caplog.text
    assert "after the answer started" in caplog.text


async def test_a_response_started_before_the_failure_is_not_answered_twice() -> None:
    start = {"type": "http.response.start", "status": 200, "headers": []}
    app = failing_app(start, error=OperationalError("database is gone"))
    communicator = ApplicationCommunicator(BackendErrorMiddleware(app), {"type": "http"})
    with pytest.raises(OperationalError):
        await communicator.wait(2)
    assert outputs(communicator) == [start]


async def test_other_errors_pass_through_untouched() -> None:
    app = failing_app(error=ValueError("a bug"))
    communicator = ApplicationCommunicator(BackendErrorMiddleware(app), {"type": "http"})
    with pytest.raises(ValueError, match="a bug"):
        await communicator.wait(2)
    assert outputs(communicator) == []


# -- StreamingAuthMiddlewareStack -------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("kind", ["websocket", "http"])
async def test_the_auth_stack_wraps_send_only_where_the_session_may_be_saved(kind: str) -> None:
    """Channels' session wrapper saves on ``http.response.start`` only: a WebSocket's frames go
    to the server's own send; HTTP keeps the wrapper. Both get the session and the user."""
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.update(send=send, session=scope["session"], user=scope["user"])

    async def server_send(message: dict[str, Any]) -> None:
        pass

    async def receive() -> dict[str, Any]:
        return {"type": f"{kind}.disconnect"}

    scope = {"type": kind, "path": "/", "headers": [(b"cookie", b"sessionid=nothing")]}
    await StreamingAuthMiddlewareStack(app)(scope, receive, server_send)
    assert (seen["send"] is server_send) == (kind == "websocket")
    assert seen["session"].session_key is None  # an unknown key: a new, empty session
    assert not await asyncio.to_thread(lambda: seen["user"].is_authenticated)


@pytest.mark.django_db(transaction=True)
async def test_the_user_is_looked_up_only_for_a_session_that_may_hold_one() -> None:
    """No session key (no cookie, or one no session has): the user is anonymous and nothing is
    read, so no trip to the database's thread. A signed-in session's user takes one."""

    def sign_in() -> tuple[int, str]:
        user = get_user_model().objects.create_user("ann", password="secret")
        session = SessionStore()
        session[SESSION_KEY] = str(user.pk)
        session[HASH_SESSION_KEY] = user.get_session_auth_hash()
        session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
        session.save()
        assert session.session_key is not None
        return user.pk, session.session_key

    user_id, session_key = await sync_to_async(sign_in)()
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen["user"] = scope["user"]

    async def nothing(*args: Any) -> Any:
        return {"type": "websocket.disconnect"}

    for cookie, expected, trips in ((b"", None, 0), (b"sessionid=nothing", None, 0),
                                    (f"sessionid={session_key}".encode(), user_id, 1)):  # fmt: skip
        calls = gathered.calls
        scope = {"type": "websocket", "path": "/", "headers": [(b"cookie", cookie)]}
        await StreamingAuthMiddlewareStack(app)(scope, nothing, nothing)
        assert gathered.calls - calls == trips, cookie
        assert await asyncio.to_thread(lambda: seen["user"].pk) == expected, cookie
