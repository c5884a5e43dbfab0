"""Every STREAMING_APP setting is checked at start-up with a stable id."""

from __future__ import annotations

from typing import Any

import pytest
from channels_redis.core import RedisChannelLayer
from django.core.checks import Error
from django.test import override_settings

from streaming_app.checks import (
    check_fast_path,
    check_settings,
    database_messages,
    layer_messages,
)
from streaming_app.layers import StreamLayer

from .servers import base_env, manage


def ids(setting: Any, **extra: Any) -> set[str]:
    with override_settings(STREAMING_APP=setting, **extra):
        return {m.id for m in check_settings() if m.id}


def test_defaults_pass() -> None:
    assert [m for m in check_settings() if isinstance(m, Error)] == []


@pytest.mark.parametrize(
    ("setting", "check_id"),
    [
        (["not", "a", "dict"], "streaming_app.E001"),
        ({"MAX_CONCURRENT_STREAMS": 0}, "streaming_app.E002"),
        ({"DEFAULT_STREAM_INACTIVITY_TIMEOUT_MS": -5}, "streaming_app.E003"),
        ({"MAX_CLIENTS_PER_STREAM": "ten"}, "streaming_app.E004"),
        ({"ON_CLIENT_SEND_ERROR_BEHAVIOR": "explode"}, "streaming_app.E005"),
        ({"MAX_CHUNK_BYTES": 0}, "streaming_app.E006"),
        ({"MAX_CLIENT_FRAME_BYTES": None}, "streaming_app.E007"),
        ({"HISTORY_MAX_CHUNKS": -1}, "streaming_app.E008"),
        ({"HISTORY_MAX_AGE_SECONDS": 0}, "streaming_app.E009"),
        ({"SWEEP_INTERVAL_SECONDS": 0}, "streaming_app.E010"),
        ({"CLIENT_TIMEOUT_SECONDS": True}, "streaming_app.E011"),
        ({"DELIVERY_TIMEOUT_SECONDS": -1}, "streaming_app.E012"),
        ({"HISTORY_BACKEND": "nowhere.Nothing"}, "streaming_app.E013"),
        ({"CAN_SUBSCRIBE": "streaming_app.auth.missing"}, "streaming_app.E014"),
        ({"CAN_CANCEL": 42}, "streaming_app.E015"),
        ({"MAX_STREAMS": 5}, "streaming_app.E016"),
        ({"CHANNEL_LAYER": "other"}, "streaming_app.E017"),
        ({"AGENT": "streaming_app.agents.nope"}, "streaming_app.E018"),
        ({"SSE_KEEPALIVE_SECONDS": 0}, "streaming_app.E019"),
        ({"COALESCE_TEXT_MS": -20}, "streaming_app.E032"),
        ({"CLIENT_TIMEOUT_SECONDS": 10, "SWEEP_INTERVAL_SECONDS": 5}, "streaming_app.E020"),
    ],
)
def test_each_bad_value_has_its_own_check(setting: Any, check_id: str) -> None:
    assert check_id in ids(setting)


def test_databases_the_limits_cannot_rely_on_are_warned_about() -> None:
    sqlite = {"NAME": "/srv/db.sqlite3", "OPTIONS": {}}
    assert [m.id for m in database_messages("sqlite", sqlite)] == ["streaming_app.W001"]
    immediate = {"NAME": "/srv/db.sqlite3", "OPTIONS": {"transaction_mode": "IMMEDIATE"}}
    assert database_messages("sqlite", immediate) == []
    assert database_messages("postgresql", {"NAME": "app"}) == []
    assert [m.id for m in database_messages("mysql", {})] == ["streaming_app.W002"]


# channels_redis ships no types: its classes are Any.
class SlowPopLayer(RedisChannelLayer):  # type: ignore[misc]
    """A core layer that blocks longer in each receive."""

    brpop_timeout = 20


CORE = "channels_redis.core.RedisChannelLayer"
ADDRESS = "redis://127.0.0.1:6379/0"


def layer(*hosts: Any, backend: str = CORE) -> dict[str, Any]:
    return {"BACKEND": backend, "CONFIG": {"hosts": list(hosts)}}


@pytest.mark.parametrize(
    ("config", "warned"),
    [
        (layer({"address": ADDRESS}), True),  # redis-py 8's default: 5 s
        (layer(ADDRESS), True),
        (layer(("127.0.0.1", 6379)), True),
        ({"BACKEND": CORE}, True),  # channels_redis's default host
        (layer({"address": ADDRESS, "socket_timeout": 5}), True),
        (layer({"address": ADDRESS, "socket_timeout": 15}), False),
        (layer({"address": ADDRESS, "socket_timeout": None}), False),  # blocks for ever
        # redis-py lets the address's query win over the keyword.
        (layer({"address": ADDRESS + "?socket_timeout=5", "socket_timeout": 15}), True),
        (layer({"address": ADDRESS + "?socket_timeout=15"}), False),
        (layer({"address": ADDRESS, "socket_timeout": 15}, {"address": ADDRESS}), True),
        (layer({"address": ADDRESS, "socket_timeout": 15},
               backend="tests.test_checks.SlowPopLayer"), True),
        (layer({"address": ADDRESS, "socket_timeout": 30},
               backend="tests.test_checks.SlowPopLayer"), False),
        (layer({"address": ADDRESS}, backend="channels_redis.pubsub.RedisPubSubChannelLayer"),
         False),
        ({"BACKEND": "channels.layers.InMemoryChannelLayer"}, False),
        ({"BACKEND": "nowhere.Layer"}, False),
    ],
)  # fmt: skip
def test_a_core_redis_layer_whose_idle_receives_would_time_out_is_warned_about(
    config: dict[str, Any], warned: bool
) -> None:
    messages = layer_messages("default", config)
    assert [m.id for m in messages] == (["streaming_app.W003"] if warned else [])
    assert all(m.hint and "socket_timeout" in m.hint for m in messages)
    with override_settings(CHANNEL_LAYERS={"default": config}):
        assert ("streaming_app.W003" in {m.id for m in check_settings()}) is warned


def test_the_projects_redis_layers_pass() -> None:
    """The demo's own CHANNEL_LAYERS, as ``manage.py check`` sees them on Redis (the check
    does not connect)."""
    for backend in (CORE, "channels_redis.pubsub.RedisPubSubChannelLayer"):
        env = base_env(REDIS_URL=ADDRESS, CHANNEL_LAYER_BACKEND=backend)
        result = manage("check", "--fail-level", "WARNING", env=env)
        assert result.returncode == 0, (backend, result.stdout, result.stderr)


@pytest.mark.django_db
def test_the_fast_path_proves_itself_at_check_deploy(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    layers = {"default": {"BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
                          "CONFIG": {"hosts": [{"address": redis_url}]}}}  # fmt: skip
    streaming = {"HISTORY_BACKEND": "streaming_app.redis_history.RedisHistory",
                 "REDIS_URL": redis_url}  # fmt: skip
    with override_settings(CHANNEL_LAYERS=layers, STREAMING_APP=streaming):
        assert check_fast_path() == []
        # As if channels_redis renamed its group channels (a change no test can make).
        monkeypatch.setattr(StreamLayer, "pubsub_group_prefix",
                            lambda self: (redis_url, "asgi__renamed__streaming."))  # fmt: skip
        assert [m.id for m in check_fast_path()] == ["streaming_app.W004"]
    assert check_fast_path() == []  # not configured for it: nothing to prove
