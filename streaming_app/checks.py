"""System checks: every ``STREAMING_APP`` setting is validated at start-up, with a stable id."""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

from django.core.checks import CheckMessage, Error, Tags, Warning, register
from django.db import connections
from django.utils.module_loading import import_string

from .coalesce import window_error
from .conf import DEFAULTS, SETTING_NAME, StreamingManagerConfig, app_settings

# The id of each StreamingManagerConfig field's check.
CONFIG_CHECK_IDS = {
    "max_concurrent_streams": "streaming_app.E002",
    "default_stream_inactivity_timeout_ms": "streaming_app.E003",
    "max_clients_per_stream": "streaming_app.E004",
    "on_client_send_error_behavior": "streaming_app.E005",
}
POSITIVE_NUMBERS = {
    "MAX_CHUNK_BYTES": "streaming_app.E006",
    "MAX_CLIENT_FRAME_BYTES": "streaming_app.E007",
    "HISTORY_MAX_CHUNKS": "streaming_app.E008",
    "HISTORY_MAX_AGE_SECONDS": "streaming_app.E009",
    "SWEEP_INTERVAL_SECONDS": "streaming_app.E010",
    "CLIENT_TIMEOUT_SECONDS": "streaming_app.E011",
    "DELIVERY_TIMEOUT_SECONDS": "streaming_app.E012",
    "SSE_KEEPALIVE_SECONDS": "streaming_app.E019",
    "MAX_STREAMS_PER_OWNER": "streaming_app.E021",
    "MAX_STREAMS_PER_SESSION": "streaming_app.E022",
    "MAX_NEW_STREAMS_PER_MINUTE": "streaming_app.E023",
    "REDIS_MAX_CONNECTIONS": "streaming_app.E025",
    "HISTORY_MAX_TOTAL_BYTES": "streaming_app.E026",
    "CLIENT_WINDOW_CHUNKS": "streaming_app.E027",
    "CLIENT_WINDOW_BYTES": "streaming_app.E028",
    "CLIENT_MAX_UNREAD_BYTES": "streaming_app.E029",
    "INLINE_CHUNK_BYTES": "streaming_app.E030",
    "SNAPSHOT_AFTER_CHUNKS": "streaming_app.E031",
}
DOTTED_PATHS = {
    "HISTORY_BACKEND": "streaming_app.E013",
    "CAN_SUBSCRIBE": "streaming_app.E014",
    "CAN_CANCEL": "streaming_app.E015",
    "AGENT": "streaming_app.E018",
}


@register(Tags.compatibility)
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Validate ``settings.STREAMING_APP``."""
    from django.conf import settings

    raw = getattr(settings, SETTING_NAME, {})
    if not isinstance(raw, dict):
        return [Error(f"{SETTING_NAME} must be a dict.", hint="See the README's Settings.",
                      id="streaming_app.E001")]  # fmt: skip
    messages: list[CheckMessage] = []
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        messages.append(Error(
            f"{SETTING_NAME} has unknown keys: {', '.join(unknown)}.",
            hint=f"Known keys: {', '.join(DEFAULTS)}.", id="streaming_app.E016",
        ))  # fmt: skip
    problems = app_settings.manager_config().errors()
    for name, problem in problems.items():
        messages.append(Error(
            f"{SETTING_NAME}['{name.upper()}'] {problem}.",
            hint=f"Default: {DEFAULTS[name.upper()]!r}.", id=CONFIG_CHECK_IDS[name],
        ))  # fmt: skip
    for key, check_id in POSITIVE_NUMBERS.items():
        value = app_settings.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            messages.append(Error(
                f"{SETTING_NAME}['{key}'] must be a positive number, not {value!r}.",
                hint=f"Default: {DEFAULTS[key]!r}.", id=check_id,
            ))  # fmt: skip
    for key, check_id in DOTTED_PATHS.items():
        value = app_settings.get(key)
        try:
            import_string(value)
        except (ImportError, TypeError, ValueError, AttributeError) as exc:
            messages.append(Error(
                f"{SETTING_NAME}['{key}'] = {value!r} cannot be imported: {exc}.",
                hint="Give a dotted path to an importable object.", id=check_id,
            ))  # fmt: skip
    coalesce = window_error(app_settings.COALESCE_TEXT_MS)
    if coalesce is not None:
        messages.append(Error(
            f"{SETTING_NAME}['COALESCE_TEXT_MS'] {coalesce}.",
            hint="Default: 0 (off); agent UIs use about 20.", id="streaming_app.E032",
        ))  # fmt: skip
    token = app_settings.get("METRICS_TOKEN")
    if not isinstance(token, str) or (token and len(token) < 32):
        messages.append(Error(
            f"{SETTING_NAME}['METRICS_TOKEN'] must be a string of at least 32 characters "
            "(or empty: metrics only for users with the permission).",
            hint="e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'",
            id="streaming_app.E024",
        ))  # fmt: skip
    alias = app_settings.CHANNEL_LAYER
    if alias not in getattr(settings, "CHANNEL_LAYERS", {}):
        messages.append(Error(
            f"{SETTING_NAME}['CHANNEL_LAYER'] = {alias!r} is not in CHANNEL_LAYERS.",
            hint="Configure CHANNEL_LAYERS (see the README).", id="streaming_app.E017",
        ))  # fmt: skip
    timeout, interval = (
        app_settings.get("CLIENT_TIMEOUT_SECONDS"),
        app_settings.get("SWEEP_INTERVAL_SECONDS"),
    )
    if (
        all(isinstance(v, int | float) and not isinstance(v, bool) for v in (timeout, interval))
        and timeout <= 2 * interval
    ):
        messages.append(Error(
            f"{SETTING_NAME}['CLIENT_TIMEOUT_SECONDS'] ({timeout}) must be more than twice "
            f"SWEEP_INTERVAL_SECONDS ({interval}): live workers would be taken for dead.",
            hint="Defaults: 30 and 5.", id="streaming_app.E020",
        ))  # fmt: skip
    chunk_bytes = app_settings.get("MAX_CHUNK_BYTES")
    for key in ("CLIENT_WINDOW_BYTES", "CLIENT_MAX_UNREAD_BYTES"):
        value = app_settings.get(key)
        numbers = [
            v for v in (value, chunk_bytes) if isinstance(v, int) and not isinstance(v, bool)
        ]
        if len(numbers) == 2 and 0 < value < 4 * chunk_bytes:
            messages.append(Warning(
                f"{SETTING_NAME}['{key}'] ({value}) holds fewer than 4 chunks of "
                f"MAX_CHUNK_BYTES ({chunk_bytes}): big chunks would pause or send off clients "
                "after every few frames.",
                hint=f"Default: {DEFAULTS[key]!r}.", id="streaming_app.W005",
            ))  # fmt: skip
    for layer_alias, layer in getattr(settings, "CHANNEL_LAYERS", {}).items():
        messages.extend(layer_messages(layer_alias, layer))
    db = connections["default"]
    messages.extend(database_messages(db.vendor, db.settings_dict))
    return messages


def layer_messages(alias: str, layer: Any) -> list[CheckMessage]:
    """Warnings about a channel layer whose idle receives would time out: channels_redis's
    core layer blocks in BZPOPMIN for ``brpop_timeout`` seconds, so each Redis host's socket
    timeout (redis-py 8: 5 s by default) must be longer."""
    backend = layer.get("BACKEND") if isinstance(layer, dict) else None
    blocking = blocking_receive_seconds(backend)
    if blocking is None:
        return []
    config = layer.get("CONFIG") or {}
    hosts = config.get("hosts") if isinstance(config, dict) else None
    default = default_socket_timeout()
    for index, host in enumerate(hosts or [None]):  # no hosts: channels_redis's localhost
        timeout = socket_timeout(host, default)
        if timeout is not None and timeout <= blocking:
            return [Warning(
                f"CHANNEL_LAYERS[{alias!r}] ({backend}) waits up to {blocking:g} s for each "
                f"message, but the socket timeout of its Redis host {index} is {timeout:g} s: "
                "every idle receive fails with 'Timeout reading from ...' and its consumer "
                "is closed (WebSocket 1011).",
                hint=f'Give each host a "socket_timeout" above {blocking:g} s, e.g. '
                     '{"address": REDIS_URL, "socket_timeout": 15} (redis-py 8 defaults to '
                     "5 s).",
                id="streaming_app.W003",
            )]  # fmt: skip
    return []


def blocking_receive_seconds(backend: Any) -> float | None:
    """How long a receive of ``backend`` blocks in Redis; None unless it is (a subclass of)
    channels_redis's core ``RedisChannelLayer``."""
    try:
        from channels_redis.core import RedisChannelLayer

        layer_class = import_string(backend)
    except (ImportError, TypeError, ValueError, AttributeError):
        return None  # not installed, or not importable: Channels says so when it is used
    if not (inspect.isclass(layer_class) and issubclass(layer_class, RedisChannelLayer)):
        return None
    return float(layer_class.brpop_timeout)


def default_socket_timeout() -> float | None:
    """The installed redis-py's default socket timeout of an asyncio connection."""
    from redis.asyncio.connection import AbstractConnection

    default = inspect.signature(AbstractConnection).parameters["socket_timeout"].default
    return None if default is None else float(default)


def socket_timeout(host: Any, default: float | None) -> float | None:
    """The socket timeout a channels_redis ``hosts`` entry gives its connections: its
    ``socket_timeout`` key, overridden (as redis-py does) by one in its address's query."""
    if not isinstance(host, dict):
        return default  # an address, or (host, port)
    timeout = host.get("socket_timeout", default)
    address = host.get("address")
    if isinstance(address, str):
        from redis.asyncio.connection import parse_url

        # A malformed address is refused by redis-py itself when the layer connects.
        with contextlib.suppress(ValueError):
            timeout = parse_url(address).get("socket_timeout", timeout)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        return None
    return float(timeout)


def database_messages(vendor: str, settings_dict: dict[str, Any]) -> list[CheckMessage]:
    """Warnings about a database the global limits cannot rely on."""
    if (
        vendor == "sqlite"
        and settings_dict.get("OPTIONS", {}).get("transaction_mode") != "IMMEDIATE"
        and str(settings_dict.get("NAME", "")) not in ("", ":memory:")
    ):
        return [Warning(
            "SQLite without transaction_mode IMMEDIATE: concurrent creates from several "
            "processes may fail with 'database is locked'.",
            hint="Set DATABASES['default']['OPTIONS']['transaction_mode'] = 'IMMEDIATE'.",
            id="streaming_app.W001",
        )]  # fmt: skip
    if vendor not in ("sqlite", "postgresql"):
        return [Warning(
            f"Global stream limits are enforced with locks on SQLite and PostgreSQL; "
            f"{vendor} may overshoot them under concurrent creates.",
            hint="Use PostgreSQL in production.", id="streaming_app.W002",
        )]  # fmt: skip
    return []


@register(Tags.compatibility, deploy=True)
def check_fast_path(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """``check --deploy``: the one-round-trip push proves itself against the real Redis (each
    worker also does before its first push, and logs an error when it cannot)."""
    from asgiref.sync import async_to_sync

    from .manager import StreamingManager

    manager = StreamingManager()
    try:
        manager.configure()
    except Exception:
        return []  # the settings checks say what is wrong
    if not manager.publishes_in_the_append:
        return []  # not configured for it: pushes append, then group_send
    try:
        proven = async_to_sync(manager._prove_fast_path)()
        problem = "" if proven else "the layer received something else"
    except Exception as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if not problem:
        return []
    return [Warning(
        f"The one-round-trip push could not prove itself ({problem}); pushes fall back to "
        "append, then group_send (slower, nothing lost).",
        hint="Check that channels_redis's layer (pub/sub or core) and "
             "STREAMING_APP['REDIS_URL'] use the same Redis, and the layer's message format.",
        id="streaming_app.W004",
    )]  # fmt: skip


__all__ = ["StreamingManagerConfig", "check_fast_path", "check_settings", "layer_messages"]
