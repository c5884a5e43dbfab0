"""Settings of the demo site.

The embedded default is SQLite + the in-memory channel layer (one process, nothing to install).
``DATABASE_URL`` switches to another database (PostgreSQL in production); ``REDIS_URL`` to
channels_redis and Redis-backed history, for many processes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

# Fail closed: DEBUG only when asked for (DJANGO_DEBUG=1, as the README's demo command does), and
# no published default key outside it.
DEBUG = os.environ.get("DJANGO_DEBUG", "") == "1"
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "Set DJANGO_SECRET_KEY (a long random string, e.g. from "
            "`python -c 'import secrets; print(secrets.token_urlsafe(50))'`), "
            "or DJANGO_DEBUG=1 to run the demo with an insecure development key."
        )
    SECRET_KEY = "django-insecure-streaming-app-demo-key-for-development-only"
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost,testserver").split(",")

# Behind TLS (DJANGO_HTTPS=1, as the README's production settings say): HTTPS only, secure
# cookies, HSTS. The proxy in front terminates TLS and must set (not pass through)
# X-Forwarded-Proto.
if os.environ.get("DJANGO_HTTPS", "") == "1":
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = True
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = int(os.environ.get("DJANGO_HSTS_SECONDS", str(365 * 24 * 3600)))
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "streaming_app",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "project.urls"
ASGI_APPLICATION = "project.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES: dict[str, Any] = {
    # Persistent connections (checked before reuse): registering a client is a few
    # statements, not a new connection each time (PostgreSQL's handshake dominated it).
    "default": dj_database_url.config(
        default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}", conn_max_age=60, conn_health_checks=True
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Take the write lock at BEGIN so concurrent creates serialise instead of failing.
    DATABASES["default"].setdefault("OPTIONS", {})["transaction_mode"] = "IMMEDIATE"
    DATABASES["default"]["OPTIONS"].setdefault("timeout", 20)
    # Write-ahead log: readers do not wait for the writer, and a commit is an append to the
    # log that is synced at checkpoints (synchronous=NORMAL), not two syncs of the database:
    # registering a client is a write, and the commit's syncs were most of its time.
    DATABASES["default"]["OPTIONS"].setdefault(
        "init_command", "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"
    )

REDIS_URL = os.environ.get("REDIS_URL", "")
if REDIS_URL:
    from redis.exceptions import ConnectionError as RedisConnectionError

    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": os.environ.get(
                "CHANNEL_LAYER_BACKEND", "channels_redis.pubsub.RedisPubSubChannelLayer"
            ),
            "CONFIG": {
                "hosts": [
                    {
                        "address": REDIS_URL,
                        "max_connections": 1000,
                        # Above channels_redis.core's 5 s blocking pop (BZPOPMIN): redis-py
                        # 8's default of 5 s failed every idle receive ("Timeout reading
                        # from ...", close 1011). Check streaming_app.W003 guards it.
                        "socket_timeout": 15,
                        # channels_redis's pools retry nothing, so a connection that Redis
                        # (its `timeout`) or a proxy closed while idle failed the next send
                        # ("Connection closed by server"). Retry once on a new connection; a
                        # chunk event sent twice this way still reaches each client once (by
                        # its seq), and the other stream events are idempotent.
                        "retry_on_error": [RedisConnectionError],
                    }
                ]
            },
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

STREAMING_APP: dict[str, Any] = {}
if REDIS_URL:
    STREAMING_APP["HISTORY_BACKEND"] = "streaming_app.redis_history.RedisHistory"
    STREAMING_APP["REDIS_URL"] = REDIS_URL
# Any STREAMING_APP key can be set from the environment as JSON, e.g.
# STREAMING_APP_JSON='{"MAX_CONCURRENT_STREAMS": 500}'.
STREAMING_APP.update(json.loads(os.environ.get("STREAMING_APP_JSON", "{}")))

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
# The demo's own static files: the /aisdk/ page's bundle of the `ai` package (built from
# tests/js, `npm run build`), which is the demo's, not the reusable app's.
STATICFILES_DIRS = [BASE_DIR / "project" / "static"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LOGIN_URL = "admin:login"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "streaming_app": {
            "handlers": ["console"],
            "level": os.environ.get("STREAMING_LOG", "INFO"),
            "propagate": False,
        },
    },
}
