"""Who may subscribe to (and cancel) a stream: a pluggable rule and its default."""

from __future__ import annotations

from typing import Any

from django.utils.module_loading import import_string

from .conf import app_settings
from .exceptions import GMIErrorCode, StreamError
from .models import Stream
from .registry import database_sync_to_async


def default_can_subscribe(user: Any, session_key: str | None, stream: Stream) -> bool:
    """Staff, the stream's owner, and the anonymous session that created it."""
    if getattr(user, "is_authenticated", False) and (
        user.is_staff or (stream.owner_id is not None and stream.owner_id == user.pk)
    ):
        return True
    return bool(stream.session_key) and stream.session_key == session_key


@database_sync_to_async
def _check(
    rule: str, user: Any, session_key: str | None, stream_id: str, *, allow_closed: bool
) -> Stream:
    try:
        stream = Stream.objects.get(pk=stream_id)
    except Stream.DoesNotExist:
        raise StreamError(
            GMIErrorCode.RESOURCE_NOT_FOUND, f"stream {stream_id!r} does not exist",
            stream_id=stream_id,
        ) from None  # fmt: skip
    if not stream.is_active and not allow_closed:
        raise StreamError(
            GMIErrorCode.STREAM_CLOSED,
            f"stream {stream_id!r} is closed ({stream.close_reason})",
            stream_id=stream_id,
            details={"reason": stream.close_reason},
        )
    if not import_string(rule)(user, session_key, stream):
        raise StreamError(
            GMIErrorCode.PERMISSION_DENIED, f"not allowed to use stream {stream_id!r}",
            stream_id=stream_id,
        )  # fmt: skip
    return stream


def scope_identity(scope: dict[str, Any]) -> tuple[Any, str | None]:
    """The user and session key of an ASGI scope (after AuthMiddlewareStack)."""
    session = scope.get("session")
    return scope.get("user"), getattr(session, "session_key", None)


async def authorize_subscribe(scope: dict[str, Any], stream_id: str) -> Stream:
    """The stream (active or closed) the scope's user may see; raises ``StreamError``
    (NOT_FOUND, PERMISSION_DENIED)."""
    return await _check(
        app_settings.CAN_SUBSCRIBE, *scope_identity(scope), stream_id, allow_closed=True
    )


async def authorize_cancel(scope: dict[str, Any], stream_id: str) -> Stream:
    """Like :func:`authorize_subscribe`, with the ``CAN_CANCEL`` rule."""
    return await _check(
        app_settings.CAN_CANCEL, *scope_identity(scope), stream_id, allow_closed=False
    )
