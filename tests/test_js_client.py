"""The JavaScript client's reconnection policy, in Debian's headless Chromium.

The back-off tests run the client on a blank page whose ``WebSocket`` and ``setTimeout`` are
stand-ins (``HARNESS``): each test drives the sockets' events and reads the delays asked for.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from .servers import ROOT, DaphneServer, base_env, manage, migrated_sqlite
from .test_browser import ARGS, CHROMIUM

pytestmark = pytest.mark.browser

CLIENT_JS = ROOT / "streaming_app" / "static" / "streaming_app" / "streaming-client.js"

# Stand-ins for the page's WebSocket and setTimeout: sockets are kept to be driven by hand
# (what the client sends is kept in socket.sent), timers are recorded (window.delays, until
# cleared) and run by runTimers(). seeded(n): a small PRNG
# (mulberry32), so a test can give each client its own reproducible random source.
HARNESS = """
window.sockets = []; window.delays = []; window.timers = [];
window.WebSocket = function (url) { this.url = url; this.readyState = 0; sockets.push(this); };
window.WebSocket.OPEN = 1;
window.WebSocket.prototype.close = function () { this.readyState = 3; };
window.WebSocket.prototype.send = function (data) {
  (this.sent = this.sent || []).push(JSON.parse(data));
};
window.timerIds = 0;
window.setTimeout = function (fn, ms) {
  var timer = {id: ++timerIds, fn: fn, ms: ms};
  delays.push(ms); timers.push(timer); return timer.id;
};
window.clearTimeout = function (id) {
  var timer = timers.find(function (t) { return t.id === id; });
  if (!timer) return;
  timers.splice(timers.indexOf(timer), 1);
  delays.splice(delays.lastIndexOf(timer.ms), 1);
};
window.runTimers = function () {
  var due = timers; window.timers = []; due.forEach(function (t) { t.fn(); });
};
window.seeded = function (seed) {
  return function () {
    seed = (seed + 0x6D2B79F5) | 0;
    var t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
};
"""

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


@pytest.fixture(scope="module")
def harness() -> Iterator[Page]:
    """A blank page with the client loaded over the stand-ins (no server)."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        yield page
        browser.close()


@pytest.fixture
def blank(harness: Page) -> Page:
    harness.goto("about:blank")
    harness.add_script_tag(content=HARNESS)
    harness.add_script_tag(content=CLIENT_JS.read_text())
    return harness


# Each client fails to connect (1006) seven times in a row; the delays it asked for.
FAILING = """({randoms, base, cap}) => randoms.map((r) => {
  window.delays = [];
  const options = {minBackoffMs: base, maxBackoffMs: cap};
  if (r !== null) options.random = () => r;
  const client = new StreamingClient("s", options);
  client.connect();
  for (let i = 0; i < 7; i++) {
    sockets[sockets.length - 1].onclose({code: 1006});
    runTimers();
  }
  client.close();
  return window.delays;
})"""


def test_back_off_is_full_jitter_over_the_exponential_ceiling(blank: Page) -> None:
    randoms = [0.0, 0.25, 0.5, 0.999999]
    delays = blank.evaluate(FAILING, {"randoms": randoms, "base": 100, "cap": 1000})
    ceilings = [100, 200, 400, 800, 1000, 1000, 1000]  # min(cap, base * 2**attempt)
    for r, got in zip(randoms, delays, strict=True):
        assert got == [int(r * c) for c in ceilings]  # random_between(0, ceiling)
        assert all(0 <= d <= 1000 for d in got)
    assert len({tuple(d) for d in delays}) == len(randoms)  # different randoms, different waits


def test_back_off_draws_from_math_random_by_default(blank: Page) -> None:
    delays = blank.evaluate(FAILING, {"randoms": [None] * 20, "base": 1000, "cap": 8000})
    ceilings = [1000, 2000, 4000, 8000, 8000, 8000, 8000]
    for got in delays:
        assert all(0 <= d < c for d, c in zip(got, ceilings, strict=True))
    assert len({d[0] for d in delays}) > 1  # not in lockstep


def test_clients_sent_off_by_a_restart_come_back_at_different_times(blank: Page) -> None:
    """4012 with ``reconnect``: every client resumes from its cursor, each after its own wait
    within [0, minBackoffMs), instead of all of them after exactly minBackoffMs."""
    result = blank.evaluate(
        """(count) => {
          const out = [];
          for (let i = 0; i < count; i++) {
            window.delays = [];
            const client = new StreamingClient("s", {random: seeded(i + 1)});
            client.connect();
            const socket = sockets[sockets.length - 1];
            socket.onopen();
            const send = (frame) => socket.onmessage({data: JSON.stringify(frame)});
            send({type: "subscribed", stream_id: "s", client_id: "c" + i, seq: 0});
            send({type: "chunk", seq: 1, chunk: {}});
            send({type: "reconnect", reason: "Server shutting down", last_seq: 7});
            socket.onclose({code: 4012});
            runTimers();
            out.push({delays: window.delays, url: sockets[sockets.length - 1].url});
            client.close();
          }
          return out;
        }""",
        20,
    )
    delays = [r["delays"] for r in result]
    assert all(len(d) == 1 and 0 <= d[0] < 250 for d in delays)  # the default minBackoffMs
    assert len({d[0] for d in delays}) >= 10  # spread out, not a storm at +250 ms
    assert all(r["url"].endswith("/ws/streams/s/?ack=1&last_seq=7&replay=chunks") for r in result)


def test_the_client_acks_what_it_rendered(blank: Page) -> None:
    """Every 64 chunks (or a quarter of the server's window in bytes) at once, the rest 100 ms
    after the last one; after a reconnect it counts from where it came back."""
    sent = blank.evaluate(
        """() => {
          const seen = [];
          const onChunk = (chunk, seq) => seen.push(seq);
          const client = new StreamingClient("s", {lastSeq: 10, onChunk: onChunk});
          client.connect();
          const socket = sockets[sockets.length - 1];
          socket.readyState = 1;
          socket.onopen();
          const send = (frame) => socket.onmessage({data: JSON.stringify(frame)});
          send({type: "subscribed", stream_id: "s", client_id: "c", seq: 200,
                window: {chunks: 512, bytes: 1048576}});
          for (let seq = 11; seq <= 150; seq++) send({type: "chunk", seq: seq, chunk: {}});
          const before = (socket.sent || []).slice();
          runTimers();  // 100 ms go by
          send({type: "chunk", seq: 151, chunk: {big: "x".repeat(300000)}});  // > 1 MiB / 4
          return {before: before, after: socket.sent, seen: seen.length, url: socket.url};
        }"""
    )
    assert sent["url"].endswith("?ack=1&last_seq=10&replay=chunks")
    assert sent["seen"] == 141
    assert sent["before"] == [{"type": "ack", "seq": 74}, {"type": "ack", "seq": 138}]
    assert sent["after"][2:] == [{"type": "ack", "seq": 150}, {"type": "ack", "seq": 151}]


def test_a_snapshot_replaces_the_missed_chunks_and_is_acked(blank: Page) -> None:
    result = blank.evaluate(
        """() => {
          const got = [];
          const client = new StreamingClient("s", {
            onSnapshot: (state, seq) => got.push(["snapshot", seq, state.text]),
            onChunk: (chunk, seq) => got.push(["chunk", seq]),
          });
          client.connect();
          const socket = sockets[sockets.length - 1];
          socket.readyState = 1;
          const send = (frame) => socket.onmessage({data: JSON.stringify(frame)});
          send({type: "subscribed", stream_id: "s", client_id: "c", seq: 900});
          send({type: "snapshot", seq: 900, state: {text: "so far"}});
          send({type: "snapshot", seq: 800, state: {text: "older"}});  // not shown again
          send({type: "chunk", seq: 901, chunk: {}});
          return {got: got, sent: socket.sent, url: socket.url};
        }"""
    )
    assert result["url"].endswith("?ack=1&last_seq=0")  # it takes snapshots
    assert result["got"] == [["snapshot", 900, "so far"], ["chunk", 901]]
    assert result["sent"] == [{"type": "ack", "seq": 900}]  # 900 read at once: acked now
