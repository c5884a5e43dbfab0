"""The demo's settings fail closed: DEBUG only when asked for, no start without a secret key
outside it, and ``check --deploy`` clean for the production settings the README describes."""

from __future__ import annotations

import secrets
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .servers import PYTHON, ROOT, DaphneServer, base_env, manage, migrated_sqlite, run_python

# Protocol and process behaviour, not the database's: the SQLite pass runs it (.ci/run).
pytestmark = pytest.mark.database_independent


def without(env: dict[str, str], *names: str) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in names}


def test_debug_is_off_unless_asked_for(tmp_path: Path) -> None:
    env = without(base_env(DATABASE_URL=migrated_sqlite(tmp_path)), "DJANGO_DEBUG")
    code = "from django.conf import settings; print(settings.DEBUG)"
    assert run_python(code, env=env).strip() == "False"
    assert run_python(code, env={**env, "DJANGO_DEBUG": "1"}).strip() == "True"
    assert run_python(code, env={**env, "DJANGO_DEBUG": "true"}).strip() == "False"


def test_without_a_secret_key_only_debug_starts(tmp_path: Path) -> None:
    env = without(base_env(DATABASE_URL=migrated_sqlite(tmp_path)), "DJANGO_DEBUG",
                  "DJANGO_SECRET_KEY")  # fmt: skip
    refused = manage("check", env=env)
    assert refused.returncode != 0
    assert "Set DJANGO_SECRET_KEY" in refused.stderr
    # Daphne does not start on a published key either.
    daphne = subprocess.run(
        [PYTHON, "-m", "daphne", "-p", "0", "project.asgi:application"], env=env, cwd=ROOT,
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert daphne.returncode != 0
    assert "Set DJANGO_SECRET_KEY" in daphne.stderr
    # The README's demo command asks for DEBUG, and runs on a development key.
    demo = manage("check", env={**env, "DJANGO_DEBUG": "1"})
    assert demo.returncode == 0, demo.stderr


def test_errors_show_no_debug_page_by_default(tmp_path: Path) -> None:
    env = without(base_env(DATABASE_URL=migrated_sqlite(tmp_path), REDIS_URL=""), "DJANGO_DEBUG")
    with DaphneServer(env, log=tmp_path / "daphne.log") as server:
        try:
            urllib.request.urlopen(server.http_url + "/no-such-page/")
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read().decode()
        else:  # pragma: no cover - the assertion below says what happened
            status, body = 200, ""
    assert status == 404
    assert "URLconf" not in body and "settings" not in body.lower(), body


def test_check_deploy_is_clean_for_the_readme_production_settings(
    database_url: str, redis_url: str
) -> None:
    env = without(base_env(), "DJANGO_DEBUG")
    env.update(
        DJANGO_SECRET_KEY=secrets.token_urlsafe(50),
        DJANGO_ALLOWED_HOSTS="chat.example.com",
        DJANGO_HTTPS="1",
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
    )
    result = manage("check", "--deploy", "--fail-level", "WARNING", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout, result.stdout + result.stderr
    # Without the TLS settings Django's own deploy checks say what is missing.
    plain = manage("check", "--deploy", "--fail-level", "WARNING", env=without(env, "DJANGO_HTTPS"))
    assert plain.returncode != 0
    assert "security.W004" in plain.stderr + plain.stdout
