from __future__ import annotations

from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class StreamingAppConfig(AppConfig):
    name = "streaming_app"
    verbose_name = _("Streaming")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.contrib.auth.signals import user_logged_in

        from . import checks  # noqa: F401  (registers the system checks)
        from .auth import adopt_anonymous_streams

        user_logged_in.connect(adopt_anonymous_streams, dispatch_uid="streaming_app.adopt")
