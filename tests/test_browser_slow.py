"""A slow tab in Debian's headless Chromium: network throttled and a page that takes its time
over each chunk. The server pauses it at its window instead of buffering for it, the reply
still arrives whole, and the worker's memory stays flat."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from .servers import DaphneServer, manager_call, start_python, with_settings
from .test_browser import ARGS, CHROMIUM
from .test_slow_clients import MIB, produce, rss

pytestmark = pytest.mark.browser

CHUNKS, CHUNK_BYTES = 600, 8 * 1024  # 4.8 MB: almost five times the window of 1 MiB

# A page that renders slowly: 2 ms of work for each chunk, after the client hands it over.
FOLLOW = """(sid) => {
  window.got = []; window.done = false;
  const client = new StreamingClient(sid, {
    onChunk: (chunk) => {
      const until = performance.now() + 2;
      while (performance.now() < until) {}
      got.push(parseInt(chunk.text_delta.slice(0, 8), 10));
    },
    onClosed: () => { window.done = true; },
  });
  client.connect();
}"""


def test_a_throttled_tab_gets_the_whole_reply_while_the_server_stays_flat(
    env: dict[str, str], tmp_path: Path
) -> None:
    env = {**env, "DJANGO_DEBUG": "1"}  # the page's scripts are served by the site itself
    with (
        DaphneServer(env, log=tmp_path / "daphne.log") as server,
        sync_playwright() as playwright,
    ):
        assert server.process is not None
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(base_url=server.http_url)
        page.goto("/")
        cdp = page.context.new_cdp_session(page)
        cdp.send("Network.enable")
        cdp.send("Network.emulateNetworkConditions", {
            "offline": False, "latency": 100, "downloadThroughput": 1024 * 1024,
            "uploadThroughput": 64 * 1024,
        })  # fmt: skip
        sid = manager_call(env, "out = await m.create_stream()")
        page.evaluate(FOLLOW, sid)
        page.wait_for_function("() => window.StreamingClient !== undefined")
        time.sleep(0.5)  # let the subscription land before the first push
        before = peak = rss(server.process.pid)
        producer = start_python(produce(sid, CHUNKS, CHUNK_BYTES), env=env)
        try:
            deadline = time.monotonic() + 120
            while not page.evaluate("window.done") and time.monotonic() < deadline:
                peak = max(peak, rss(server.process.pid))
                time.sleep(0.05)
            assert producer.wait(60) == 0, producer.communicate()[1]
        finally:
            producer.kill()
            producer.communicate()
        got = page.evaluate("window.got")
        browser.close()
        log = server.log()
    growth = peak - before
    print(f"\nDaphne RSS +{growth / MIB:.1f} MiB while a throttled tab read {CHUNKS} chunks")
    assert got == list(range(1, CHUNKS + 1))
    assert "paused at seq" in log  # the server held the reply back for the tab
    assert growth <= 1 * MIB + 20 * MIB, f"RSS grew {growth / MIB:.1f} MiB"
    assert "Traceback" not in log, log


def test_a_late_joiner_renders_a_long_reply_from_one_snapshot(
    env: dict[str, str], tmp_path: Path
) -> None:
    """The chat page following a 1,000-delta reply it joins late: one snapshot frame, then the
    tail, and the bubble holds the whole text; the Redis history keeps only 100 chunks, so the
    producer's process kept the snapshot in Redis and the worker read it from there."""
    env = with_settings({**env, "DJANGO_DEBUG": "1"}, HISTORY_MAX_CHUNKS=100)
    with (
        DaphneServer(env, log=tmp_path / "daphne.log") as server,
        sync_playwright() as playwright,
    ):
        sid = manager_call(env, "out = await m.create_stream()")
        words = [f"w{i} " for i in range(1, 1001)]
        manager_call(env, f"await m.push_chunks({sid!r}, [TextDeltaChunk(stream_id={sid!r}, "
                          f"text_delta=w) for w in {words!r}])")  # fmt: skip
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(base_url=server.http_url)
        frames: list[str] = []
        page.on("websocket", lambda ws: ws.on("framereceived", lambda f: frames.append(str(f))))
        page.goto(f"/?stream={sid}")
        bubble = page.locator(".turn.agent .bubble")
        page.wait_for_function("() => document.querySelector('.turn.agent .bubble')"
                               "?.textContent.endsWith('w1000 ')")  # fmt: skip
        manager_call(env, f"await m.push_chunks({sid!r}, [TextDeltaChunk(stream_id={sid!r}, "
                          "text_delta=w) for w in ['tail1 ', 'tail2 ']])\n"
                          f"await m.close_stream({sid!r}, 'Interaction complete.')")  # fmt: skip
        page.wait_for_function("() => document.getElementById('status').textContent === 'idle'")
        text = bubble.inner_text()
        browser.close()
    kinds = [json.loads(f)["type"] for f in frames]
    assert kinds == ["subscribed", "snapshot", "chunk", "chunk", "closed"], kinds
    assert text.strip() == "".join([*words, "tail1 ", "tail2 "]).strip()
