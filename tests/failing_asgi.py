"""A test-only ASGI app whose WebSocket consumer cannot send chunks: the one failure a test
cannot cause for real across processes (a socket that errors on write)."""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

from django.core.asgi import get_asgi_application

django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path  # noqa: E402

from streaming_app.consumers import StreamConsumer  # noqa: E402


class FailingConsumer(StreamConsumer):
    async def send(self, text_data: str | None = None, *args: Any, **kwargs: Any) -> None:
        if text_data is not None and text_data.startswith('{"type":"chunk"'):
            raise ConnectionResetError("socket write failed")
        await super().send(text_data, *args, **kwargs)


application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": URLRouter([path("ws/streams/<str:stream_id>/", FailingConsumer.as_asgi())]),
    }
)
