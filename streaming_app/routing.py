"""WebSocket URL patterns; include them in the project's ``URLRouter``."""

from __future__ import annotations

from django.urls import path

from .consumers import StreamConsumer

websocket_urlpatterns = [
    path("ws/streams/<str:stream_id>/", StreamConsumer.as_asgi(), name="streaming-ws"),
]
