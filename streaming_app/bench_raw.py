"""Raw Channels for the benchmark's baseline: a consumer that forwards group messages as they
are, served by its own ASGI app (``streaming_app.bench_raw:application``), never by the site."""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

from django.core.asgi import get_asgi_application

django_asgi_app = get_asgi_application()

from channels.consumer import get_handler_name  # noqa: E402
from channels.exceptions import StopConsumer  # noqa: E402
from channels.generic.websocket import AsyncWebsocketConsumer  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path  # noqa: E402

RAW_GROUP_PREFIX = "rawbench."


class RawConsumer(AsyncWebsocketConsumer):
    """What a hand-written Channels chat does: join a group, forward its messages."""

    async def connect(self) -> None:
        self.group = RAW_GROUP_PREFIX + self.scope["url_route"]["kwargs"]["stream_id"]
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        await self.channel_layer.group_discard(self.group, self.channel_name)

    async def raw_chunk(self, event: dict[str, Any]) -> None:
        await self.send(text_data=event["text"])


class RawNoHopConsumer(RawConsumer):
    """The same, without Channels' database clean-up (``aclose_old_connections``, a thread
    hop) before every message and after the disconnect, as streaming_app's consumer goes
    without it: it touches no database. The honest baseline: the best a hand-written consumer
    can do."""

    async def dispatch(self, message: dict[str, Any]) -> None:
        await getattr(self, get_handler_name(message))(message)

    async def websocket_disconnect(self, message: dict[str, Any]) -> None:
        await self.disconnect(message["code"])
        raise StopConsumer()


class RawBatchConsumer(RawNoHopConsumer):
    """The baseline writing every ``BATCH`` chunks as one frame (a JSON array of them; the
    closing frame flushes what is held): what a frame carrying a client's backlog would cost per
    delivered chunk (``bench_batch``)."""

    BATCH = 10
    held: list[str]

    async def connect(self) -> None:
        self.held = []
        await super().connect()

    async def raw_chunk(self, event: dict[str, Any]) -> None:
        self.held.append(event["text"])
        if len(self.held) >= self.BATCH or event["text"].startswith('{"type":"closed"'):
            held, self.held = self.held, []
            await self.send(text_data=f"[{','.join(held)}]")


application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": URLRouter([
            path("raw/<str:stream_id>/", RawConsumer.as_asgi()),
            path("rawnohop/<str:stream_id>/", RawNoHopConsumer.as_asgi()),
            path("rawbatch/<str:stream_id>/", RawBatchConsumer.as_asgi()),
        ]),
    }
)  # fmt: skip
