"""The /aisdk/ demo page in Debian's headless Chromium against a real Daphne: the reply is read
by the AI SDK's own Chat (the bundle in project/static/demo) from the UI message stream."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, expect

from .servers import DaphneServer, base_env, migrated_sqlite

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaphneServer]:
    directory = tmp_path_factory.mktemp("browser-aisdk")
    # DEBUG as in the README's demo command: the site serves the page's bundle itself.
    env = base_env(DATABASE_URL=migrated_sqlite(directory), DJANGO_DEBUG="1")
    with DaphneServer(env, log=directory / "daphne.log") as running:
        yield running


@pytest.fixture
def page(browser: Browser, server: DaphneServer) -> Iterator[Page]:
    context = browser.new_context(base_url=server.http_url)
    page = context.new_page()
    page.set_default_timeout(15_000)
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on(
        "response", lambda r: problems.append(f"{r.url}: {r.status}") if r.status >= 400 else None
    )
    yield page
    context.close()
    assert problems == []  # no console error, script error or failed request


def send(page: Page, message: str) -> None:
    page.goto("/aisdk/")
    page.fill("#message", message)
    page.click("#send")
    expect(page.locator(".turn.agent .bubble")).to_have_count(1)


def reply(page: Page) -> str:
    return page.locator(".turn.agent .bubble").last.inner_text()


def wait_done(page: Page) -> None:
    expect(page.locator(".turn.agent .parts li.done")).to_have_text("Done: Interaction complete.")


def test_the_reply_arrives_whole_with_its_tool_and_data_parts(page: Page) -> None:
    send(page, "alpha beta gamma delta epsilon zeta eta theta")
    wait_done(page)
    text = reply(page)
    assert text.startswith("You said 8 words.") and text.count("You said") == 1
    assert text.endswith("streamed token by token.")
    parts = page.locator(".turn.agent .parts")
    words = "alpha beta gamma delta epsilon zeta eta theta"
    expect(parts.locator(".tool")).to_have_text(
        f'Tool word_count {{"text":"{words}"}} returned {{"words":8}}'
    )
    expect(parts.locator(".progress")).to_have_text(["Reading your message (10%)",
                                                     "Writing the answer (50%)"])  # fmt: skip
    expect(parts.locator(".ui-command")).to_have_text("UI command highlight")
    expect(page.locator(".turn.agent .bubble.highlight")).to_have_count(1)
    expect(parts.locator(".metadata")).to_contain_text("words: 8")
    expect(page.locator("#status")).to_have_text("ready")


def test_a_reload_mid_reply_resumes_and_shows_the_reply_once(page: Page) -> None:
    send(page, " ".join(["reload"] * 80))
    expect(page.locator(".turn.agent .bubble")).to_contain_text("Here they are")
    assert "streamed token by token" not in reply(page)  # the reply is still coming
    page.reload()
    wait_done(page)
    text = reply(page)
    assert text.count("You said 80 words.") == 1
    assert text.count("reload") == 80
    assert text.endswith("streamed token by token.")
    expect(page.locator(".turn.agent .parts .tool")).to_have_count(1)
    expect(page.locator(".turn.agent .parts .progress")).to_have_count(2)


def test_someone_elses_reply_says_so(browser: Browser, page: Page, server: DaphneServer) -> None:
    send(page, "mine only")
    stream_id = page.locator(".turn.agent").get_attribute("data-stream-id")
    stranger = browser.new_context(base_url=server.http_url).new_page()
    stranger.set_default_timeout(15_000)
    stranger.on("console", lambda m: None)
    stranger.goto(f"/aisdk/?stream={stream_id}")
    expect(stranger.locator(".notice")).to_have_text(
        "This reply does not exist or is not yours to see."
    )
    expect(stranger.locator(".turn.agent .bubble")).to_have_text("")
    stranger.context.close()
