"""The chat page and the admin in Debian's headless Chromium, against a real Daphne."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, expect

from .conftest import ARGS, CHROMIUM
from .servers import DaphneServer, base_env, manage, migrated_sqlite

__all__ = ["ARGS", "CHROMIUM"]  # the other browser tests launch their own Chromium with these

pytestmark = pytest.mark.browser

# Set to a path to save the README's screenshot of the chat page.
SCREENSHOT = os.environ.get("STREAMING_SCREENSHOT", "")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaphneServer]:
    directory = tmp_path_factory.mktemp("browser")
    # DEBUG as in the README's demo command: the page's scripts are served by the site itself.
    env = base_env(DATABASE_URL=migrated_sqlite(directory), DJANGO_SUPERUSER_PASSWORD="s3cret-pw",
                   DJANGO_DEBUG="1")  # fmt: skip
    made = manage("createsuperuser", "--noinput", "--username", "admin",
                  "--email", "admin@example.com", env=env)  # fmt: skip
    assert made.returncode == 0, made.stderr
    with DaphneServer(env, log=directory / "daphne.log") as running:
        yield running


@pytest.fixture
def page(browser: Browser, server: DaphneServer) -> Iterator[Page]:
    context = browser.new_context(base_url=server.http_url)
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield page
    context.close()


def send(page: Page, message: str) -> None:
    page.goto("/")
    page.fill("#message", message)
    page.click("#send")
    expect(page.locator(".turn.agent .bubble")).to_have_count(1)


def reply(page: Page) -> str:
    return page.locator(".turn.agent .bubble").last.inner_text()


def wait_done(page: Page) -> None:
    expect(page.locator(".turn.agent .events li", has_text="Done")).to_have_count(1)


def test_a_message_streams_a_reply_token_by_token(page: Page) -> None:
    send(page, "alpha beta gamma delta epsilon zeta eta theta")
    snapshots = []
    for _ in range(200):
        snapshots.append(reply(page))
        if page.locator(".turn.agent .events li", has_text="Done").count():
            break
        page.wait_for_timeout(40)
    grown = [s for s in dict.fromkeys(snapshots) if s]
    assert len(grown) >= 5  # the reply appeared piece by piece
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(grown))
    wait_done(page)
    final = reply(page)
    assert final.startswith("You said 8 words.")
    assert final.count("You said") == 1
    assert "Calling tool word_count" in page.locator(".turn.agent .events").inner_text()
    if SCREENSHOT:
        page.screenshot(path=SCREENSHOT)


def test_stop_ends_the_reply(page: Page) -> None:
    send(page, " ".join(["word"] * 120))
    expect(page.locator(".turn.agent .bubble")).to_contain_text("You said")
    page.click("#stop")
    expect(page.locator(".turn.agent .events")).to_contain_text("Stream closed: cancelled")
    stopped = reply(page)
    page.wait_for_timeout(500)
    assert reply(page) == stopped
    assert "streamed token by token" not in stopped
    expect(page.locator("#send")).to_be_enabled()


def test_a_second_tab_follows_the_same_reply(page: Page) -> None:
    send(page, " ".join(["tab"] * 40))
    expect(page).to_have_url(re.compile(r"[?&]stream="))
    second = page.context.new_page()
    second.goto(page.url)
    wait_done(page)
    wait_done(second)
    assert reply(second) == reply(page)
    assert reply(page).count("You said") == 1


def test_a_reload_mid_reply_ends_with_the_full_reply_once(page: Page) -> None:
    send(page, " ".join(["reload"] * 40))
    expect(page.locator(".turn.agent .bubble")).to_contain_text("Here they are")
    page.reload()
    wait_done(page)
    text = reply(page)
    assert text.count("You said 40 words.") == 1
    assert text.endswith("streamed token by token.")
    assert text.count("reload") == 40


def test_a_dropped_connection_resumes_and_shows_the_reply_once(page: Page) -> None:
    send(page, " ".join(["drop"] * 40))
    expect(page.locator(".turn.agent .bubble")).to_contain_text("Here they are")
    page.evaluate("window.streamingClient.socket.close(3001, 'network blip')")
    wait_done(page)
    text = reply(page)
    assert text.count("You said 40 words.") == 1
    assert text.count("drop") == 40
    assert text.endswith("streamed token by token.")


def test_an_operator_closes_a_stream_from_the_admin_and_the_page_sees_it(
    browser: Browser, page: Page, server: DaphneServer
) -> None:
    send(page, " ".join(["long"] * 300))
    stream_id = page.url.split("stream=")[1]
    operator = browser.new_context(base_url=server.http_url).new_page()
    operator.goto("/admin/login/?next=/admin/streaming_app/stream/")
    operator.fill("#id_username", "admin")
    operator.fill("#id_password", "s3cret-pw")
    operator.click("input[type=submit]")
    operator.check(f"input[name=_selected_action][value='{stream_id}']")
    operator.select_option("select[name=action]", "close_streams")
    operator.click("button[name=index]")
    operator.fill("input[name=reason]", "Closed for maintenance")
    operator.click("#confirm-close")
    expect(operator.locator(".messagelist")).to_contain_text("Closed 1 stream.")
    expect(page.locator(".turn.agent .events")).to_contain_text(
        "Stream closed: Closed for maintenance"
    )


def test_the_admin_changelist_counts_refresh_by_themselves(
    browser: Browser, page: Page, server: DaphneServer
) -> None:
    operator = browser.new_context(base_url=server.http_url).new_page()
    operator.set_default_timeout(15_000)
    operator.goto("/admin/login/?next=/admin/streaming_app/stream/")
    operator.fill("#id_username", "admin")
    operator.fill("#id_password", "s3cret-pw")
    operator.click("input[type=submit]")
    active = operator.locator("#streaming-live [data-field=active]")
    before = int(active.inner_text())
    send(page, " ".join(["count"] * 300))  # a new stream, while the changelist stays open
    expect(active).to_have_text(str(before + 1))  # refreshed without a reload
    expect(active).to_have_text(str(before), timeout=30_000)  # the reply ends, the count too


# -- conversations and the page's manners (issue 12) ---------------------------------------


def test_a_conversation_comes_back_whole_on_reload_and_in_the_list(page: Page) -> None:
    send(page, "first question here")
    wait_done(page)
    page.fill("#message", "and a second one")
    page.click("#send")
    expect(page.locator(".turn.agent .events li", has_text="Done")).to_have_count(2)
    expect(page).to_have_url(re.compile(r"\?c=[0-9a-f]+$"))  # the conversation, not a stream
    page.reload()
    expect(page.locator(".turn.user .bubble")).to_have_text(["first question here",
                                                             "and a second one"])  # fmt: skip
    replies = page.locator(".turn.agent .bubble")
    expect(replies).to_have_count(2)
    assert replies.nth(0).inner_text().startswith("You said 3 words.")
    assert "This is turn 2 of our conversation" in replies.nth(1).inner_text()
    expect(page.locator("#conversations a.current")).to_have_text("first question here")


def test_a_long_word_wraps_on_a_phone(browser: Browser, server: DaphneServer) -> None:
    phone = browser.new_context(base_url=server.http_url, viewport={"width": 390, "height": 800})
    page = phone.new_page()
    page.set_default_timeout(15_000)
    send(page, "x" * 300)
    wait_done(page)
    wide = page.evaluate("""() => [...document.querySelectorAll('body *')]
        .filter(e => e.getBoundingClientRect().right > window.innerWidth + 1)
        .map(e => e.tagName + '.' + e.className)""")  # what sticks out, if anything
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), wide
    phone.close()


def test_a_refused_message_stays_in_the_composer_with_one_reason(page: Page) -> None:
    page.goto("/")
    too_long = "y" * 4001
    page.fill("#message", too_long)
    page.click("#send")
    expect(page.locator(".notice")).to_contain_text("limited to 4000 characters")
    expect(page.locator(".notice")).to_have_count(1)
    assert page.input_value("#message") == too_long
    expect(page.locator(".turn")).to_have_count(0)
    expect(page.locator("#send")).to_be_enabled()


def test_someone_elses_reply_or_a_made_up_one_says_so_once(
    browser: Browser, page: Page, server: DaphneServer
) -> None:
    send(page, "mine only")
    stream_id = page.url.split("stream=")[1]
    stranger = browser.new_context(base_url=server.http_url).new_page()
    stranger.set_default_timeout(15_000)
    for target in (stream_id, "0" * 32):
        stranger.goto(f"/?stream={target}")
        notice = stranger.locator(".notice")
        expect(notice).to_have_text("This reply does not exist or is not yours to see.")
        stranger.wait_for_function("window.streamingClient && window.streamingClient.finished")
        expect(notice).to_have_count(1)
        expect(stranger.locator(".turn.agent")).to_have_count(0)
    stranger.context.close()


def test_the_page_follows_the_reply_unless_the_reader_scrolled_up(
    browser: Browser, server: DaphneServer
) -> None:
    small = browser.new_context(base_url=server.http_url, viewport={"width": 390, "height": 400})
    page = small.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("requestfailed", lambda r: errors.append(r.url))
    send(page, " ".join(["scroll"] * 120))
    done = page.locator(".turn.agent .events li", has_text="Done")
    expect(done).to_have_count(1, timeout=30_000)
    at_bottom = "window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 40"
    assert page.evaluate("document.documentElement.scrollHeight > 2 * window.innerHeight")
    assert page.evaluate(at_bottom)  # it followed the reply down
    page.fill("#message", " ".join(["again"] * 120))
    page.click("#send")
    expect(page.locator(".turn.agent .bubble").last).to_contain_text("You said")
    page.evaluate("window.scrollTo(0, 0)")  # the reader goes back up mid-reply
    expect(done).to_have_count(2, timeout=30_000)
    assert page.evaluate("window.scrollY") == 0  # and the page left them there
    assert errors == []  # no console error, no failed request (a favicon included)
    small.close()


def test_the_page_loads_and_replies_without_console_errors(
    browser: Browser, server: DaphneServer
) -> None:
    # A browser of its own: Chromium asks a site for /favicon.ico once per browser, not per page.
    fresh = browser.browser_type.launch(executable_path=CHROMIUM, args=ARGS)
    try:
        page = fresh.new_page(base_url=server.http_url)
        page.set_default_timeout(15_000)
        problems: list[str] = []
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("requestfailed", lambda r: problems.append(f"{r.url}: {r.failure}"))
        page.on(
            "response",
            lambda r: problems.append(f"{r.url}: {r.status}") if r.status >= 400 else None,
        )
        page.goto("/", wait_until="networkidle")
        page.fill("#message", "no errors please")
        page.click("#send")
        wait_done(page)
        assert problems == []
    finally:
        fresh.close()
