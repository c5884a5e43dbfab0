"""The site's ASGI application plus test-only endpoints under ``/__probe__/`` that report this
worker's own state (channel layer, event loop, manager) and add plain clients and watchers,
for the leak tests. Never route these in a real site."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

from project.asgi import application as site
from streaming_app.chunks import AgentOSResponse
from streaming_app.manager import get_streaming_manager

_waiting: set[asyncio.Task[str]] = set()


class CountingClient:
    """A plain StreamClient living in the worker (carried by a ChannelBridge)."""

    def __init__(self, client_id: str) -> None:
        self._id = client_id
        self.chunks = 0

    @property
    def id(self) -> str:
        return self._id

    async def send_chunk(self, chunk: AgentOSResponse) -> None:
        self.chunks += 1

    async def notify_stream_closed(self, reason: str | None = None) -> None:
        return None

    def is_active(self) -> bool:
        return True


def state() -> dict[str, Any]:
    """What this worker holds right now, from the layer's, the loop's and the manager's own
    bookkeeping."""
    manager = get_streaming_manager()
    layer: Any = manager.layer.layer
    local = layer._get_layer() if hasattr(layer, "_get_layer") else layer  # pub/sub: per loop
    shards = getattr(local, "_shards", [])
    rss = next(
        int(line.split()[1])
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    return {
        "groups": len(getattr(local, "groups", {})),
        "channels": len(getattr(local, "channels", {})),
        "subscriptions": sum(len(shard._subscribed_to) for shard in shards),
        "tasks": len(asyncio.all_tasks()),
        "followers": len(manager.worker),
        "watches": len(manager.watches),
        "rss_kib": rss,
        "kinds": sorted({name.split(".")[1] for name in getattr(local, "channels", {})}),
    }


async def probe(scope: dict[str, Any], receive: Any, send: Any) -> None:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    manager = get_streaming_manager()
    action = scope["path"].removeprefix("/__probe__/")
    if action == "state":
        result: Any = state()
    elif action == "bridge":  # POST a JSON list of stream ids: a plain client on each
        ids = json.loads(body)
        for stream_id in ids:
            await manager.register_client(stream_id, CountingClient(f"py-{stream_id}"))
        result = len(ids)
    elif action == "wait":  # POST a JSON list of stream ids: an agent waiting for each close
        ids = json.loads(body)
        for stream_id in ids:
            task = asyncio.create_task(manager.wait_closed(stream_id))
            _waiting.add(task)
            task.add_done_callback(_waiting.discard)
        await asyncio.sleep(0)
        result = len(ids)
    else:
        result = None
    payload = json.dumps(result).encode()
    status = 404 if result is None else 200
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})  # fmt: skip
    await send({"type": "http.response.body", "body": payload})


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http" and scope["path"].startswith("/__probe__/"):
        await probe(scope, receive, send)
    else:
        await site(scope, receive, send)
