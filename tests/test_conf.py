"""``app_settings`` keeps the values it read, and reads them again when a setting changes."""

from __future__ import annotations

from django.conf import settings
from django.test import override_settings

from streaming_app.conf import DEFAULTS, app_settings


def test_values_are_read_again_after_override_settings() -> None:
    before = app_settings.get("HISTORY_MAX_CHUNKS")
    with override_settings(STREAMING_APP={"HISTORY_MAX_CHUNKS": before + 7}):
        assert app_settings.get("HISTORY_MAX_CHUNKS") == before + 7
    assert app_settings.get("HISTORY_MAX_CHUNKS") == before


def test_values_are_kept_between_changes() -> None:
    with override_settings(STREAMING_APP={"HISTORY_MAX_CHUNKS": 11}):
        assert app_settings.get("HISTORY_MAX_CHUNKS") == 11
        # A change that bypasses Django's signal is not seen: what is kept is used.
        settings.STREAMING_APP["HISTORY_MAX_CHUNKS"] = 12
        assert app_settings.get("HISTORY_MAX_CHUNKS") == 11
        app_settings.reload()
        assert app_settings.get("HISTORY_MAX_CHUNKS") == 12


def test_a_key_not_set_takes_its_default() -> None:
    with override_settings(STREAMING_APP={}):
        assert app_settings.get("SWEEP_INTERVAL_SECONDS") == DEFAULTS["SWEEP_INTERVAL_SECONDS"]
