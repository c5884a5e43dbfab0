"""The one reader of Django settings: ``settings.STREAMING_APP`` over typed defaults.

Values are read when asked for, never at import, so ``override_settings`` just works.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Literal, cast

from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver

SendErrorBehavior = Literal["log_and_continue", "deregister_client", "throw"]
SEND_ERROR_BEHAVIORS: tuple[SendErrorBehavior, ...] = (
    "log_and_continue",
    "deregister_client",
    "throw",
)

SETTING_NAME = "STREAMING_APP"

DEFAULTS: dict[str, Any] = {
    # The seed's StreamingManagerConfig.
    "MAX_CONCURRENT_STREAMS": 1000,
    "DEFAULT_STREAM_INACTIVITY_TIMEOUT_MS": 300_000,
    "MAX_CLIENTS_PER_STREAM": 10,
    "ON_CLIENT_SEND_ERROR_BEHAVIOR": "log_and_continue",
    # Fair shares: active streams per signed-in owner, per anonymous session, and streams one
    # of them may start per minute (``math.inf``: no limit). Streams created with neither an
    # owner nor a session (a task's, a script's) meet only MAX_CONCURRENT_STREAMS.
    "MAX_STREAMS_PER_OWNER": 5,
    "MAX_STREAMS_PER_SESSION": 2,
    "MAX_NEW_STREAMS_PER_MINUTE": 20,
    # Chunks and client frames.
    "MAX_CHUNK_BYTES": 64 * 1024,
    "MAX_CLIENT_FRAME_BYTES": 4096,
    # A chunk up to this size travels inside its channel-layer event; a bigger one is
    # announced by its seq and read from the history by each worker's followers.
    "INLINE_CHUNK_BYTES": 4096,
    # A client that joins (or resumes) more than this many chunks behind gets one snapshot
    # frame, the reply assembled so far, instead of the chunks (unless ?replay=chunks).
    "SNAPSHOT_AFTER_CHUNKS": 200,
    # Text deltas this process pushes to a stream within this many ms of its last text are
    # merged into one chunk (0: off; a stream's own ``create_stream(coalesce_ms=...)`` wins).
    "COALESCE_TEXT_MS": 0,
    # Slow clients. A client that acks (``?ack=1`` or its first ``ack`` frame) has at most this
    # many chunks / bytes written and not acked; beyond, it is paused and catches up from
    # history as its acks come. A client that does not ack is sent off (``reconnect``, 4013)
    # once this many bytes were written since its last ack (an SSE response: since it began).
    "CLIENT_WINDOW_CHUNKS": 512,
    "CLIENT_WINDOW_BYTES": 1024 * 1024,
    "CLIENT_MAX_UNREAD_BYTES": 4 * 1024 * 1024,
    # Per-stream sequence numbers and history.
    "HISTORY_BACKEND": "streaming_app.history.MemoryHistory",
    "HISTORY_MAX_CHUNKS": 5000,
    "HISTORY_MAX_AGE_SECONDS": 3600,
    # MemoryHistory: all streams' chunks together (oldest dropped first beyond it).
    "HISTORY_MAX_TOTAL_BYTES": 256 * 1024 * 1024,
    # Redis for RedisHistory (empty: not used), and its connection pool per process: a push
    # beyond this many at once waits for a connection (up to 20 s) instead of failing.
    "REDIS_URL": "",
    "REDIS_MAX_CONNECTIONS": 200,
    # Who may subscribe: a callable ``(user, session_key, stream) -> bool`` by dotted path.
    "CAN_SUBSCRIBE": "streaming_app.auth.default_can_subscribe",
    # Who may cancel a stream from a client frame: same signature.
    "CAN_CANCEL": "streaming_app.auth.default_can_cancel",
    # The agent the demo chat runs: an async generator function by dotted path.
    "AGENT": "streaming_app.agents.local_agent",
    # Which channel layer carries the streams.
    "CHANNEL_LAYER": "default",
    # Background work in serving processes.
    "SWEEP_INTERVAL_SECONDS": 5.0,
    "CLIENT_TIMEOUT_SECONDS": 30.0,
    "DELIVERY_TIMEOUT_SECONDS": 5.0,
    # Server-Sent Events: a comment this often keeps proxies from closing an idle response.
    "SSE_KEEPALIVE_SECONDS": 15.0,
    # GET /streams/metrics with "Authorization: Bearer <token>" (empty: only users with the
    # permission "Can view streaming metrics").
    "METRICS_TOKEN": "",
}


@dataclass(frozen=True)
class StreamingManagerConfig:
    """The seed's four options; ``math.inf`` is accepted for "no limit" where the seed allows."""

    max_concurrent_streams: float = 1000
    default_stream_inactivity_timeout_ms: float = 300_000
    max_clients_per_stream: float = 10
    on_client_send_error_behavior: SendErrorBehavior = "log_and_continue"

    def errors(self) -> dict[str, str]:
        """Map each invalid field to what is wrong with it; empty when the config is valid."""
        problems: dict[str, str] = {}
        for name in (
            "max_concurrent_streams",
            "default_stream_inactivity_timeout_ms",
            "max_clients_per_stream",
        ):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or math.isnan(value)
                or value <= 0
            ):
                problems[name] = f"must be a positive number, not {value!r}"
            elif not math.isinf(value) and value != int(value):
                problems[name] = f"must be a whole number or math.inf, not {value!r}"
        if self.on_client_send_error_behavior not in SEND_ERROR_BEHAVIORS:
            problems["on_client_send_error_behavior"] = (
                f"must be one of {', '.join(SEND_ERROR_BEHAVIORS)}, "
                f"not {self.on_client_send_error_behavior!r}"
            )
        return problems

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


class AppSettings:
    """Typed access to ``settings.STREAMING_APP``; unknown keys are reported by system checks.

    The values are read once and kept: the push and delivery paths read settings for every
    chunk. ``override_settings`` (Django's ``setting_changed`` signal) drops what was kept."""

    def __init__(self) -> None:
        self._values: dict[str, Any] | None = None

    def user_values(self) -> dict[str, Any]:
        value = getattr(settings, SETTING_NAME, {})
        return dict(value) if isinstance(value, dict) else {}

    def get(self, key: str) -> Any:
        values = self._values
        if values is None:
            values = self._values = {**DEFAULTS, **self.user_values()}
        return values[key]

    def reload(self) -> None:
        self._values = None

    def manager_config(self) -> StreamingManagerConfig:
        """The StreamingManagerConfig described by the settings (not validated here)."""
        return StreamingManagerConfig(
            max_concurrent_streams=self.get("MAX_CONCURRENT_STREAMS"),
            default_stream_inactivity_timeout_ms=self.get("DEFAULT_STREAM_INACTIVITY_TIMEOUT_MS"),
            max_clients_per_stream=self.get("MAX_CLIENTS_PER_STREAM"),
            on_client_send_error_behavior=cast(
                SendErrorBehavior, self.get("ON_CLIENT_SEND_ERROR_BEHAVIOR")
            ),
        )

    def allowed_hosts(self) -> list[str]:
        """Django's ``ALLOWED_HOSTS`` as Django applies it (with DEBUG's local defaults)."""
        hosts = list(settings.ALLOWED_HOSTS)
        if settings.DEBUG and not hosts:
            hosts = [".localhost", "127.0.0.1", "[::1]"]
        return hosts

    @property
    def MAX_STREAMS_PER_OWNER(self) -> float:
        return float(self.get("MAX_STREAMS_PER_OWNER"))

    @property
    def MAX_STREAMS_PER_SESSION(self) -> float:
        return float(self.get("MAX_STREAMS_PER_SESSION"))

    @property
    def MAX_NEW_STREAMS_PER_MINUTE(self) -> float:
        return float(self.get("MAX_NEW_STREAMS_PER_MINUTE"))

    @property
    def MAX_CHUNK_BYTES(self) -> int:
        return int(self.get("MAX_CHUNK_BYTES"))

    @property
    def MAX_CLIENT_FRAME_BYTES(self) -> int:
        return int(self.get("MAX_CLIENT_FRAME_BYTES"))

    @property
    def SNAPSHOT_AFTER_CHUNKS(self) -> int:
        return int(self.get("SNAPSHOT_AFTER_CHUNKS"))

    @property
    def COALESCE_TEXT_MS(self) -> Any:
        return self.get("COALESCE_TEXT_MS")  # validated by the manager and the checks

    @property
    def INLINE_CHUNK_BYTES(self) -> int:
        return int(self.get("INLINE_CHUNK_BYTES"))

    @property
    def CLIENT_WINDOW_CHUNKS(self) -> int:
        return int(self.get("CLIENT_WINDOW_CHUNKS"))

    @property
    def CLIENT_WINDOW_BYTES(self) -> int:
        return int(self.get("CLIENT_WINDOW_BYTES"))

    @property
    def CLIENT_MAX_UNREAD_BYTES(self) -> int:
        return int(self.get("CLIENT_MAX_UNREAD_BYTES"))

    @property
    def HISTORY_BACKEND(self) -> str:
        return str(self.get("HISTORY_BACKEND"))

    @property
    def HISTORY_MAX_CHUNKS(self) -> int:
        return int(self.get("HISTORY_MAX_CHUNKS"))

    @property
    def HISTORY_MAX_AGE_SECONDS(self) -> float:
        return float(self.get("HISTORY_MAX_AGE_SECONDS"))

    @property
    def HISTORY_MAX_TOTAL_BYTES(self) -> float:
        return float(self.get("HISTORY_MAX_TOTAL_BYTES"))

    @property
    def REDIS_URL(self) -> str:
        return str(self.get("REDIS_URL"))

    @property
    def REDIS_MAX_CONNECTIONS(self) -> int:
        return int(self.get("REDIS_MAX_CONNECTIONS"))

    @property
    def AGENT(self) -> str:
        return str(self.get("AGENT"))

    @property
    def CAN_SUBSCRIBE(self) -> str:
        return str(self.get("CAN_SUBSCRIBE"))

    @property
    def CAN_CANCEL(self) -> str:
        return str(self.get("CAN_CANCEL"))

    @property
    def CHANNEL_LAYER(self) -> str:
        return str(self.get("CHANNEL_LAYER"))

    @property
    def SWEEP_INTERVAL_SECONDS(self) -> float:
        return float(self.get("SWEEP_INTERVAL_SECONDS"))

    @property
    def CLIENT_TIMEOUT_SECONDS(self) -> float:
        return float(self.get("CLIENT_TIMEOUT_SECONDS"))

    @property
    def DELIVERY_TIMEOUT_SECONDS(self) -> float:
        return float(self.get("DELIVERY_TIMEOUT_SECONDS"))

    @property
    def SSE_KEEPALIVE_SECONDS(self) -> float:
        return float(self.get("SSE_KEEPALIVE_SECONDS"))


app_settings = AppSettings()


@receiver(setting_changed)
def _reload(*, setting: str, **kwargs: Any) -> None:
    if setting == SETTING_NAME:
        app_settings.reload()
