"""The worker's lifecycle on servers that send ASGI lifespan events (Uvicorn, Hypercorn)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from channels.routing import URLRouter
from channels.testing import ApplicationCommunicator, WebsocketCommunicator
from django.contrib.auth.models import AnonymousUser
from django.contrib.sessions.backends.db import SessionStore

from streaming_app.lifecycle import StreamingLifecycle
from streaming_app.manager import StreamingManager
from streaming_app.protocol import CloseCode
from streaming_app.routing import websocket_urlpatterns

from .conftest import delta

pytestmark = pytest.mark.django_db(transaction=True)


async def test_lifespan_starts_the_worker_and_releases_its_clients_on_shutdown(
    manager: StreamingManager, session_key: str
) -> None:
    app = StreamingLifecycle(URLRouter(websocket_urlpatterns))
    lifespan = ApplicationCommunicator(app, {"type": "lifespan", "asgi": {"version": "3.0"}})
    await lifespan.send_input({"type": "lifespan.startup"})
    assert await lifespan.receive_output(2) == {"type": "lifespan.startup.complete"}
    assert manager.sweeper.running  # heartbeats and reaping from the start, not the first client

    stream_id = await manager.create_stream(session_key=session_key)
    socket = WebsocketCommunicator(app, f"/ws/streams/{stream_id}/")
    socket.scope["user"] = AnonymousUser()
    socket.scope["session"] = SessionStore(session_key=session_key)
    assert (await socket.connect())[0]
    assert (await socket.receive_json_from())["type"] == "subscribed"
    await manager.push_chunk(stream_id, delta(stream_id, "hello"))
    assert (await socket.receive_json_from())["seq"] == 1

    await lifespan.send_input({"type": "lifespan.shutdown"})
    frames: list[dict[str, Any]] = []
    while (output := await socket.receive_output(2))["type"] == "websocket.send":
        frames.append(json.loads(output["text"]))
    assert output == {"type": "websocket.close", "code": CloseCode.SERVICE_RESTART}
    assert frames == [{"type": "reconnect", "reason": "Server shutting down", "last_seq": 1}]
    assert await lifespan.receive_output(5) == {"type": "lifespan.shutdown.complete"}
    assert await manager.registry.client_count(stream_id) == 0
    assert (await manager.registry.get_stream(stream_id)).is_active  # the stream goes on
    assert not manager.sweeper.running
    await socket.disconnect()
