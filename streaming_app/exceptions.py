"""Errors raised by streaming_app: ``GMIError`` and its stream-specific ``StreamError``."""

from __future__ import annotations

from enum import StrEnum
from http import HTTPStatus
from typing import Any


class GMIErrorCode(StrEnum):
    """Stable error codes; each maps to the HTTP status a view should answer with."""

    NOT_INITIALIZED = "NOT_INITIALIZED"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    RESOURCE_NOT_FOUND = "RESOURCE_NOT_FOUND"
    RESOURCE_ALREADY_EXISTS = "RESOURCE_ALREADY_EXISTS"
    RATE_LIMIT_EXCEEDED = "RATE_LIMIT_EXCEEDED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    STREAM_CLOSED = "STREAM_CLOSED"
    STREAM_ERROR = "STREAM_ERROR"
    CLIENT_SEND_FAILED = "CLIENT_SEND_FAILED"
    BACKEND_UNAVAILABLE = "BACKEND_UNAVAILABLE"

    @property
    def http_status(self) -> HTTPStatus:
        return _HTTP_STATUS[self]


_HTTP_STATUS: dict[GMIErrorCode, HTTPStatus] = {
    GMIErrorCode.NOT_INITIALIZED: HTTPStatus.SERVICE_UNAVAILABLE,
    GMIErrorCode.INVALID_ARGUMENT: HTTPStatus.BAD_REQUEST,
    GMIErrorCode.RESOURCE_NOT_FOUND: HTTPStatus.NOT_FOUND,
    GMIErrorCode.RESOURCE_ALREADY_EXISTS: HTTPStatus.CONFLICT,
    GMIErrorCode.RATE_LIMIT_EXCEEDED: HTTPStatus.TOO_MANY_REQUESTS,
    GMIErrorCode.PERMISSION_DENIED: HTTPStatus.FORBIDDEN,
    GMIErrorCode.STREAM_CLOSED: HTTPStatus.GONE,
    GMIErrorCode.STREAM_ERROR: HTTPStatus.INTERNAL_SERVER_ERROR,
    GMIErrorCode.CLIENT_SEND_FAILED: HTTPStatus.BAD_GATEWAY,
    GMIErrorCode.BACKEND_UNAVAILABLE: HTTPStatus.SERVICE_UNAVAILABLE,
}


class GMIError(Exception):
    """Base error: a ``code`` from :class:`GMIErrorCode`, a message and JSON-able details."""

    def __init__(
        self, code: GMIErrorCode, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details: dict[str, Any] = details or {}

    @property
    def http_status(self) -> HTTPStatus:
        return self.code.http_status

    def to_dict(self) -> dict[str, Any]:
        """The error as a JSON-able mapping (for error frames and API answers)."""
        return {"code": str(self.code), "message": self.message, "details": self.details}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!s}, {self.message!r})"


class StreamError(GMIError):
    """An error about one stream, and where it concerns one client, that client."""

    def __init__(
        self,
        code: GMIErrorCode,
        message: str,
        *,
        stream_id: str | None = None,
        client_id: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(code, message, details)
        self.stream_id = stream_id
        self.client_id = client_id

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["stream_id"] = self.stream_id
        data["client_id"] = self.client_id
        return data


def is_backend_error(exc: BaseException) -> bool:
    """Whether ``exc`` says a backend (database, Redis, the channel layer) failed, as opposed
    to a bug: backend failures are 4503 / HTTP 503 and worth a retry; bugs are not."""
    if isinstance(exc, GMIError):
        return exc.code is GMIErrorCode.BACKEND_UNAVAILABLE
    from django.db import Error as DatabaseError

    if isinstance(exc, DatabaseError | ConnectionError | TimeoutError):
        return True
    try:
        from redis.exceptions import RedisError
    except ImportError:  # pragma: no cover - redis is a dependency of channels_redis
        return False
    return isinstance(exc, RedisError)


def backend_error(stream_id: str | None, what: str, exc: BaseException) -> StreamError:
    """``StreamError(BACKEND_UNAVAILABLE)`` for a failed ``what`` (history, database...)."""
    return StreamError(
        GMIErrorCode.BACKEND_UNAVAILABLE,
        f"the {what} backend is unavailable"
        + (f" for stream {stream_id!r}" if stream_id else "")
        + f": {type(exc).__name__}: {exc}",
        stream_id=stream_id,
    )
