"""WebSocket URL patterns; include them in the project's ``URLRouter``."""

from __future__ import annotations

from django.urls import path, re_path

from .agui import ag_ui_events
from .aisdk import ui_message_stream
from .consumers import NoSuchPath, StreamConsumer
from .sse import stream_events

websocket_urlpatterns = [
    path("ws/streams/<str:stream_id>/", StreamConsumer.as_asgi(), name="streaming-ws"),
    re_path(r"", NoSuchPath.as_asgi()),  # last: anything else is a clean 4404
]

# Server-Sent Events (HTTP): route before the Django app, behind AuthMiddlewareStack.
sse_urlpatterns = [
    # Channels routes ASGI apps with Django's path(); django-stubs expects views there.
    path("streams/<str:stream_id>/events", stream_events, name="streaming-sse"),  # type: ignore[arg-type]
    path("streams/<str:stream_id>/ag-ui", ag_ui_events, name="streaming-ag-ui"),  # type: ignore[arg-type]
    path(
        "streams/<str:stream_id>/ui-message-stream",
        ui_message_stream,  # type: ignore[arg-type]
        name="streaming-ui-message-stream",
    ),
]
