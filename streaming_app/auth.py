"""Who may subscribe to (and cancel) a stream: a pluggable rule and its default."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.utils.crypto import constant_time_compare, salted_hmac
from django.utils.module_loading import import_string

from .conf import app_settings
from .exceptions import GMIErrorCode, StreamError
from .models import STREAM_ID_PATTERN, Conversation, Stream
from .registry import database_sync_to_async, stream_row

logger = logging.getLogger(__name__)

STREAM_ID = re.compile(STREAM_ID_PATTERN)
VIEW_CONTENTS_PERMISSION = "streaming_app.view_stream_contents"
CLOSE_PERMISSION = "streaming_app.close_stream"


SESSION_HASH_SALT = "streaming_app.Stream.session_hash"


def session_hash(session_key: str | None, *, secret: str | None = None) -> str:
    """The keyed hash of a session key that a stream stores ("" for no session): whoever reads
    the row (staff in the admin, a database dump) cannot use it as a session cookie."""
    if not session_key:
        return ""
    return salted_hmac(SESSION_HASH_SALT, session_key, secret=secret,
                       algorithm="sha256").hexdigest()  # fmt: skip


def session_hashes(session_key: str | None) -> list[str]:
    """The hashes ``session_key`` may be stored under: with ``SECRET_KEY`` and each of
    ``SECRET_KEY_FALLBACKS`` (a rotated key keeps visitors' streams theirs)."""
    if not session_key:
        return []
    secrets = [settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", [])]
    return [session_hash(session_key, secret=secret) for secret in secrets]


def created_in_session(stream: Stream | Conversation, session_key: str | None) -> bool:
    """Whether the anonymous session ``session_key`` created ``stream`` (or a conversation)."""
    return bool(stream.session_hash) and any(
        constant_time_compare(stream.session_hash, candidate)
        for candidate in session_hashes(session_key)
    )


def adopt_anonymous_streams(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    """On ``user_logged_in``: the streams the visitor started before signing in become the
    user's. Logging in gives the visitor a new session key, so the old one (the cookie the
    request came with) would otherwise no longer match their streams."""
    cookies = getattr(request, "COOKIES", None) or {}
    old_key = cookies.get(settings.SESSION_COOKIE_NAME)
    hashes = session_hashes(old_key)
    if not hashes or getattr(user, "pk", None) is None:
        return
    moved = Stream.objects.filter(session_hash__in=hashes, owner__isnull=True).update(
        owner=user, session_hash=""
    )
    chats = Conversation.objects.filter(session_hash__in=hashes, owner__isnull=True).update(
        owner=user, session_hash=""
    )
    if moved or chats:
        logger.info("%d anonymous stream(s) and %d conversation(s) now belong to user %s",
                    moved, chats, user.pk)  # fmt: skip


def is_owner(user: Any, session_key: str | None, stream: Stream | Conversation) -> bool:
    """The stream's (or conversation's) owner, or the anonymous session that created it."""
    owner = stream.owner_id
    if getattr(user, "is_authenticated", False) and owner is not None and owner == user.pk:
        return True
    return created_in_session(stream, session_key)


def default_can_subscribe(user: Any, session_key: str | None, stream: Stream) -> bool:
    """The owner, the anonymous session that created it, and users with the permission
    "Can view stream contents" (``is_staff`` alone is not enough)."""
    if is_owner(user, session_key, stream):
        return True
    return bool(getattr(user, "is_active", False) and user.has_perm(VIEW_CONTENTS_PERMISSION))


def default_can_cancel(user: Any, session_key: str | None, stream: Stream) -> bool:
    """The owner, the anonymous session that created it, and users allowed to close streams
    ("Can close streams", the admin's own permission)."""
    if is_owner(user, session_key, stream):
        return True
    return bool(getattr(user, "is_active", False) and user.has_perm(CLOSE_PERMISSION))


def check(
    rule: str, user: Any, session_key: str | None, stream_id: str, *, allow_closed: bool,
    hide: bool,
) -> Stream:  # fmt: skip
    """The stream, if ``rule`` lets the user use it (synchronous: in the database's thread)."""
    # An id that cannot exist (NUL bytes, traversal, ...) is not looked up.
    stream = stream_row(stream_id) if STREAM_ID.match(stream_id) else None
    if stream is None:
        raise _missing(stream_id)
    if not import_string(rule)(user, session_key, stream):
        if hide:  # a stranger learns nothing, not even that the id exists
            raise _missing(stream_id)
        raise StreamError(
            GMIErrorCode.PERMISSION_DENIED, f"not allowed to use stream {stream_id!r}",
            stream_id=stream_id,
        )  # fmt: skip
    if not stream.is_active and not allow_closed:
        raise StreamError(
            GMIErrorCode.STREAM_CLOSED,
            f"stream {stream_id!r} is closed ({stream.close_reason})",
            stream_id=stream_id,
            details={"reason": stream.close_reason},
        )
    return stream


def _missing(stream_id: str) -> StreamError:
    return StreamError(
        GMIErrorCode.RESOURCE_NOT_FOUND, f"stream {stream_id!r} does not exist",
        stream_id=stream_id,
    )  # fmt: skip


def scope_identity(scope: dict[str, Any]) -> tuple[Any, str | None]:
    """The user and session key of an ASGI scope (after AuthMiddlewareStack)."""
    session = scope.get("session")
    return scope.get("user"), getattr(session, "session_key", None)


_check = database_sync_to_async(check)


def subscribe_check(scope: dict[str, Any]) -> Callable[[str], Stream]:
    """Whether the scope's user may follow a stream: the check registration runs in its own
    database call (the stream, active or closed, is returned). A stream that does not exist
    *or* that the user may not see is the same ``StreamError(RESOURCE_NOT_FOUND)``, so that
    ids cannot be probed."""
    user, session_key = scope_identity(scope)
    rule = app_settings.CAN_SUBSCRIBE

    def allowed(stream_id: str) -> Stream:
        return check(rule, user, session_key, stream_id, allow_closed=True, hide=True)

    return allowed


async def authorize_cancel(scope: dict[str, Any], stream_id: str) -> Stream:
    """The active stream the scope's user may cancel; raises ``StreamError``: NOT_FOUND,
    PERMISSION_DENIED (the user follows it: hiding it would tell nothing), STREAM_CLOSED."""
    return await _check(
        app_settings.CAN_CANCEL, *scope_identity(scope), stream_id, allow_closed=False,
        hide=False,
    )  # fmt: skip
