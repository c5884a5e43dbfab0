"""The JavaScript client's reconnection policy, in Debian's headless Chromium."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from .servers import DaphneServer, base_env, manage, migrated_sqlite
from .test_browser import ARGS, CHROMIUM

pytestmark = pytest.mark.browser

GHOST = """
from datetime import timedelta
from django.utils import timezone
from streaming_app.models import StreamClient, StreamWorker
# A worker that was killed with -9 a moment ago: its heartbeat is recent, its client holds a place.
StreamWorker.objects.create(id="killed", last_seen_at=timezone.now() + timedelta(seconds=3))
StreamClient.objects.create(stream_id={sid!r}, client_id="ghost", channel_name="x",
                            worker_id="killed")
"""


@pytest.fixture
def page(tmp_path: Path) -> Iterator[tuple[Page, dict[str, str]]]:
    settings = {"MAX_CLIENTS_PER_STREAM": 2, "CLIENT_TIMEOUT_SECONDS": 2,
                "SWEEP_INTERVAL_SECONDS": 0.5}  # fmt: skip
    env = base_env(DATABASE_URL=migrated_sqlite(tmp_path), STREAMING_APP_JSON=json.dumps(settings),
                   DJANGO_DEBUG="1")  # the site serves the page's scripts itself  # fmt: skip
    with (
        DaphneServer(env, log=tmp_path / "daphne.log") as server,
        sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_context(base_url=server.http_url).new_page()
        page.set_default_timeout(20_000)
        yield page, env
        browser.close()


def test_a_resuming_client_retries_a_stream_full_of_a_dead_workers_clients(
    page: tuple[Page, dict[str, str]],
) -> None:
    tab, env = page
    tab.goto("/")
    tab.fill("#message", " ".join(["word"] * 300))  # a reply of several seconds
    tab.click("#send")
    expect(tab.locator("#share")).to_be_visible()
    stream_id = tab.locator("#share").get_attribute("href").split("=", 1)[1]  # type: ignore[union-attr]
    ghost = manage("shell", "--no-imports", "-c", GHOST.format(sid=stream_id), env=env)
    assert ghost.returncode == 0, ghost.stderr
    # A second client comes back from a worker that died, resuming after seq 1: the places
    # are the page's own client and the dead worker's, until that one stops counting.
    tab.evaluate(
        """(streamId) => {
          window.seen = []; window.statuses = []; window.closedCode = null;
          new StreamingClient(streamId, {
            lastSeq: 1, minBackoffMs: 100,
            onChunk: (chunk, seq) => window.seen.push(seq),
            onStatus: (status) => window.statuses.push(status),
            onClosed: (reason, code) => { window.closedCode = code; },
          }).connect();
        }""",
        stream_id,
    )
    tab.wait_for_function("window.seen.length > 0 || window.closedCode === 4429")
    assert tab.evaluate("window.closedCode") is None, "4429 was final for a resuming client"
    assert "waiting" in tab.evaluate("window.statuses")  # it was refused at first
    tab.wait_for_function("window.closedCode !== null")  # the reply ends
    seen = tab.evaluate("window.seen")
    assert seen == list(range(2, seen[-1] + 1))  # resumed after seq 1, nothing twice
    assert tab.evaluate("window.closedCode") == 4000
