"""HTTP views of the app: ``path("", include("streaming_app.urls"))`` in the project's URLconf."""

from __future__ import annotations

from django.urls import path

from .health import health
from .metrics import metrics

urlpatterns = [
    path("streams/health", health, name="streaming-health"),
    path("streams/metrics", metrics, name="streaming-metrics"),
]
