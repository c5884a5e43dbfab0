"""ASGI entry point: HTTP through Django, WebSockets through the streaming consumers."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402
from django.urls import re_path  # noqa: E402

from streaming_app.lifecycle import StreamingLifecycle  # noqa: E402
from streaming_app.middleware import (  # noqa: E402
    BackendErrorMiddleware,
    StreamingAuthMiddlewareStack,
)
from streaming_app.routing import sse_urlpatterns, websocket_urlpatterns  # noqa: E402

# The demo serves its static files itself when DEBUG is on (as runserver does); in production
# run collectstatic and let the web server in front of Daphne serve STATIC_ROOT.
http_app = ASGIStaticFilesHandler(django_asgi_app) if settings.DEBUG else django_asgi_app

# StreamingLifecycle: lifespan events where the server sends them, and under Daphne a SIGTERM
# that first tells this worker's clients to reconnect. BackendErrorMiddleware (outermost of the
# streaming routes): a database or Redis failure before an answer, e.g. in the session lookup of
# the auth stack, is close code 4503 / a JSON 503 instead of an HTTP 500.
# StreamingAuthMiddlewareStack: Channels' AuthMiddlewareStack (cookies, session, user) without
# the session's wrapper around every frame a WebSocket writes.
application = StreamingLifecycle(
    ProtocolTypeRouter(
        {
            # Server-Sent Events first (they need the session and user), then Django.
            "http": BackendErrorMiddleware(
                StreamingAuthMiddlewareStack(
                    URLRouter([*sse_urlpatterns, re_path(r"", http_app)])  # type: ignore[arg-type]
                )
            ),
            "websocket": BackendErrorMiddleware(
                AllowedHostsOriginValidator(
                    StreamingAuthMiddlewareStack(URLRouter(websocket_urlpatterns))
                )
            ),
        }
    )
)
