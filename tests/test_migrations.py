"""Migrations that move data: the session keys stored before 0004 become keyed hashes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from streaming_app.auth import created_in_session, session_hash
from streaming_app.models import Stream

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE = [("streaming_app", "0003_view_stream_contents")]
AFTER = [("streaming_app", "0004_session_hash")]


@pytest.fixture
def latest_after() -> Iterator[None]:
    """Leave the database fully migrated for the tests that follow."""
    yield
    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes())


def test_stored_session_keys_become_hashes_and_stay_their_visitors(latest_after: None) -> None:
    executor = MigrationExecutor(connection)
    executor.migrate(BEFORE)
    old = executor.loader.project_state(BEFORE).apps.get_model("streaming_app", "Stream")
    old.objects.create(id="anonymous", session_key="k" * 32)
    old.objects.create(id="application", session_key="")
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(AFTER)
    anonymous = Stream.objects.get(pk="anonymous")
    assert anonymous.session_hash == session_hash("k" * 32)
    assert created_in_session(anonymous, "k" * 32)
    assert Stream.objects.get(pk="application").session_hash == ""
