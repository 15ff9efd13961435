"""The web chat page in a real browser: Debian's chromium driven by
Playwright, against ``python -m chatkit.server --web-port`` as a user runs
it, with TCP users (``ChatClient``) in the same rooms.

A missing chromium fails these tests (scripts/install-test-deps.sh installs
it); they never skip.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Playwright, expect, sync_playwright

import chatkit

from .browser import CHROMIUM, TIMEOUT, ChatPage, TcpUser, WebServer, new_page
from .wsclient import upgrade_request

ROOT = Path(__file__).resolve().parent.parent
XSS = "<img src=x onerror=alert(1)>"

StartServer = Callable[..., WebServer]
OpenUser = Callable[[str], TcpUser]


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as playwright:
        yield playwright


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} not found: the browser tests need Debian's chromium "
            "(bash scripts/install-test-deps.sh installs it)"
        )
    browser = playwright.chromium.launch(executable_path=CHROMIUM)
    yield browser
    browser.close()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    """``start_server(*extra_args)``: a server with a web port and its
    history in tmp_path; killed at teardown."""
    servers: list[WebServer] = []

    def start(*extra: str, db: bool = True) -> WebServer:
        path = tmp_path / f"chat{len(servers)}.sqlite3" if db else None
        server = WebServer(tmp_path, path, *extra)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.kill()


@pytest.fixture
def open_user() -> Iterator[Callable[[int, str], TcpUser]]:
    """``open_user(port, name)``: a TCP ChatClient, closed at teardown."""
    users: list[TcpUser] = []

    def open_(port: int, name: str) -> TcpUser:
        user = TcpUser(port, name)
        users.append(user)
        return user

    yield open_
    for user in users:
        user.close()


@pytest.fixture
def pages(browser: Browser) -> Iterator[Callable[..., ChatPage]]:
    """``pages(url, width=, height=)``: the page in a new browser context.
    At teardown: no dialog opened and no uncaught error in any of them."""
    opened: list[ChatPage] = []

    def open_(url: str, width: int = 1280, height: int = 800) -> ChatPage:
        page = new_page(browser, url, width, height)
        opened.append(page)
        return page

    yield open_
    for page in opened:
        page.page.context.close()
    for page in opened:
        assert page.dialogs == [], page.dialogs
        assert page.errors == [], page.errors


def test_two_pages_and_a_tcp_client_chat_in_one_room(
    start_server: StartServer, open_user: Callable[[int, str], TcpUser], pages
) -> None:
    server = start_server()
    carol = open_user(server.port, "carol")
    carol.join("dev")
    alice = pages(server.url).login("alice")
    alice.join("dev")
    expect(alice.by("member-carol")).to_be_visible()
    bob = pages(server.url, 375, 740).login("bob")
    bob.join("dev")
    # Joins: the others see bob arrive, in the list and as a notice.
    expect(alice.by("member-bob")).to_be_visible()
    expect(alice.by("notice").filter(has_text="bob joined #dev")).to_have_count(1)
    carol.wait_for(lambda e: getattr(e, "name", None) == "bob" and e.room == "dev")

    alice.send("hi from alice")
    bob.expect_text("hi from alice")
    bob.send("hi from bob")
    alice.expect_text("hi from bob")
    carol.say("hi from carol", "dev")
    for page in (alice, bob):
        page.expect_text("hi from carol")
        expect(page.by("message-text")).to_have_text(
            ["hi from alice", "hi from bob", "hi from carol"]
        )
    said = {
        (e.sender, e.text)
        for e in carol.events
        if getattr(e, "room", None) == "dev" and hasattr(e, "text")
    }
    assert {("alice", "hi from alice"), ("bob", "hi from bob")} <= said
    # The lobby was not spoken in.
    alice.switch("room-lobby")
    expect(alice.by("message-text")).to_have_count(0)
    alice.switch("room-dev")

    # Leaves: bob leaves with the button, carol by request.
    bob.by("leave-button").click()
    expect(bob.by("title")).to_have_text("#lobby")
    expect(alice.by("member-bob")).to_have_count(0)
    expect(alice.by("notice").filter(has_text="bob left")).to_have_count(1)
    carol.leave("dev")
    expect(alice.by("member-carol")).to_have_count(0)
    expect(alice.by("member-count")).to_have_text("1")


def test_direct_messages_and_unread_counts(start_server, open_user, pages) -> None:
    server = start_server()
    alice = pages(server.url).login("alice")
    bob = pages(server.url).login("bob")
    expect(alice.by("member-bob")).to_be_visible()
    alice.by("member-bob").click()  # a member's name opens a DM
    expect(alice.by("title")).to_have_text("@bob")
    alice.send("psst, bob")
    expect(bob.by("unread-alice")).to_have_text("1")
    bob.switch("dm-alice")
    bob.expect_text("psst, bob")
    expect(bob.by("unread-alice")).to_have_count(0)
    bob.switch("room-lobby")
    bob.send("/msg alice and back")  # the command, from another room
    expect(bob.by("title")).to_have_text("@alice")
    alice.expect_text("and back")
    # Room messages count as unread where they are not shown.
    carol = open_user(server.port, "carol")
    carol.say("lobby news")
    expect(alice.by("unread-lobby")).to_have_text("1")
    carol.dm("alice", "from tcp")
    expect(alice.by("unread-carol")).to_have_text("1")
    assert "from tcp" not in alice.texts()  # bob's conversation is shown
    alice.switch("dm-carol")
    expect(alice.by("message-text")).to_have_text(["from tcp"])


def test_older_history_loads_on_scroll(start_server, open_user, pages) -> None:
    server = start_server("--rate-limit", "0")
    carol = open_user(server.port, "carol")
    carol.join("hist")
    said = [f"old {n:03}" for n in range(1, 131)]
    for text in said:
        carol.say(text, "hist")
    alice = pages(server.url, 1280, 800).login("alice")
    alice.join("hist")
    alice.expect_text("old 130")
    shown = len(alice.texts())
    assert 50 <= shown < 130  # one page, not everything
    deadline = time.monotonic() + TIMEOUT
    while alice.texts()[:1] != ["old 001"]:
        assert time.monotonic() < deadline, alice.texts()[:3]
        alice.by("scroller").evaluate("node => { node.scrollTop = 0; }")
        time.sleep(0.1)
    expect(alice.by("history-status")).to_have_text("This is the beginning of #hist.")
    assert alice.texts() == said  # each once, in order
    ids = [
        int(i)
        for i in alice.page.locator("[data-testid=message]").evaluate_all(
            "nodes => nodes.map(n => n.dataset.id)"
        )
    ]
    assert ids == sorted(ids)


def restart_offline(server: WebServer, page: ChatPage) -> None:
    """Restart ``server`` (same ports) with ``page`` offline once it saw the
    server go: it stays away until set online again."""
    server.stop()
    expect(page.by("banner")).to_have_text(re.compile(r"^Reconnecting\.\.\."))
    # Only now: Chromium's offline mode would hide the server's close frame.
    page.page.context.set_offline(True)
    server.start()


def test_reconnects_after_a_restart_and_shows_what_was_missed_once(
    start_server, open_user, pages
) -> None:
    server = start_server()
    alice = pages(server.url).login("alice")
    alice.join("dev")
    alice.send("before the restart")
    bob = open_user(server.port, "bob")
    bob.join("dev")
    bob.say("bob before", "dev")
    alice.expect_text("bob before")
    bob.close()

    # Until bob has spoken on the new server, the page cannot reach it: what
    # he says is missed, and read from history on the way back.
    restart_offline(server, alice)  # the same ports, the same database
    bob = open_user(server.port, "bob")
    bob.join("dev")
    bob.say("missed 1", "dev")
    bob.say("missed 2", "dev")
    bob.say("missed lobby")
    alice.page.context.set_offline(False)
    expect(alice.by("banner")).to_be_hidden(timeout=TIMEOUT * 1000)
    # Read from history on the way back, not received live:
    expect(alice.by("toast")).to_have_text("Reconnected: 3 new messages.")
    alice.expect_text("missed 2")
    bob.say("live after", "dev")
    alice.expect_text("live after")
    assert alice.texts() == [
        "before the restart",
        "bob before",
        "missed 1",
        "missed 2",
        "live after",
    ]
    expect(alice.by("unread-lobby")).to_have_text("1")
    alice.switch("room-lobby")
    expect(alice.by("message-text")).to_have_text(["missed lobby"])
    # Still in dev after the restart, as far as the server knows too.
    expect(alice.by("member-alice")).to_be_visible()
    assert "alice" in bob._call(bob.client.who, "dev")


def test_a_restart_without_history_starts_ids_over_and_nothing_is_dropped(
    start_server, open_user, pages
) -> None:
    server = start_server(db=False)
    alice = pages(server.url).login("alice")
    bob = open_user(server.port, "bob")
    for text in ("one", "two", "three"):
        bob.say(text)
        alice.expect_text(text)
    bob.close()
    restart_offline(server, alice)
    bob = open_user(server.port, "bob")
    first = bob.say("fresh 1")  # the ids start over: 1 again
    alice.page.context.set_offline(False)
    expect(alice.by("banner")).to_be_hidden()
    bob.say("fresh 2")
    alice.expect_text("fresh 2")
    assert first.id == 1
    assert alice.texts() == ["one", "two", "three", "fresh 1", "fresh 2"]
    expect(alice.by("notice").filter(has_text="without its history")).to_have_count(1)


def test_html_in_a_message_is_text_and_runs_nothing(
    start_server, open_user, pages
) -> None:
    server = start_server()
    alice = pages(server.url).login("alice")
    bob = pages(server.url).login("bob")
    carol = open_user(server.port, "carol")
    alice.send(XSS)
    alice.expect_text(XSS)
    carol.say(f"<b>bold?</b> <script>alert(2)</script> {XSS}")
    for page in (alice, bob):
        page.expect_text(XSS)
        expect(page.by("message-text").nth(1)).to_have_text(
            f"<b>bold?</b> <script>alert(2)</script> {XSS}"
        )
        markup = page.page.locator("#messages img, #messages b, #messages script")
        assert markup.count() == 0
    time.sleep(0.3)  # an onerror would have fired by now
    # (the pages fixture asserts at teardown that no dialog opened)
    assert alice.dialogs == [] and bob.dialogs == []


def _handshake(port: int, origin: str | None) -> str:
    """The status line a WebSocket handshake on /ws gets."""
    request, _ = upgrade_request(host=f"127.0.0.1:{port}", origin=origin)
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        return sock.makefile("rb").readline().decode().strip()


_PROBE = """<!doctype html><title>probe</title><p id=result>waiting</p>
<script>
const ws = new WebSocket("ws://127.0.0.1:%d/ws");
ws.onopen = () => ws.send(JSON.stringify({type: "hello", name: "%s", protocol: 1}));
ws.onmessage = (frame) => {
  const result = document.getElementById("result");
  const type = JSON.parse(frame.data).type;
  if (result.textContent === "waiting") result.textContent = type;
};
ws.onclose = (close) => {
  const result = document.getElementById("result");
  if (result.textContent === "waiting") result.textContent = "refused " + close.code;
};
</script>
"""


@contextlib.contextmanager
def probe_site(body: Callable[[], str]) -> Iterator[str]:
    """A web site of its own on 127.0.0.1 (another origin than the chat
    server's) serving ``body()`` at /; yields its origin."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = body().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler) as site:
        thread = threading.Thread(target=site.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{site.server_address[1]}"
        finally:
            site.shutdown()
            thread.join(TIMEOUT)


def test_a_wrong_origin_is_refused(start_server, browser: Browser) -> None:
    port = [0]
    with (
        probe_site(lambda: _PROBE % (port[0], "mallory")) as evil,
        probe_site(lambda: _PROBE % (port[0], "goodie")) as good,
    ):
        server = start_server("--web-origin", good)
        port[0] = server.web_port
        # The allowed origin is let in, besides the page's own; a client
        # without Origin (not a browser) is too; any other is refused.
        own = f"http://127.0.0.1:{server.web_port}"
        assert _handshake(server.web_port, own).split()[1] == "101"
        assert _handshake(server.web_port, good).split()[1] == "101"
        assert _handshake(server.web_port, evil).split()[1] == "403"
        assert _handshake(server.web_port, None).split()[1] == "101"
        context = browser.new_context()
        try:
            for origin, result in ((evil, "refused 1006"), (good, "welcome")):
                page = context.new_page()
                page.goto(f"{origin}/")
                expect(page.locator("#result")).to_have_text(
                    result, timeout=TIMEOUT * 1000
                )
        finally:
            context.close()


def test_the_embedding_example_of_the_docs_works_from_another_site(
    start_server, open_user, browser: Browser
) -> None:
    """docs/browsers.md's example, as another site's page importing
    chatkit.js from the chat server."""
    example = re.search(
        r"```html\n(.*?)```", (ROOT / "docs/browsers.md").read_text(), re.DOTALL
    )
    assert example, "no html example in docs/browsers.md"
    chat_server = "https://chat.example.com:8443"
    assert chat_server in example[1]
    url = [""]
    with probe_site(lambda: example[1].replace(chat_server, url[0])) as site:
        server = start_server("--web-origin", site)
        url[0] = server.url.rstrip("/")
        carol = open_user(server.port, "carol")
        carol.join("support")
        context = browser.new_context()
        try:
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(f"{site}/")
            joined = carol.wait_for(
                lambda e: (
                    isinstance(e, chatkit.Joined)
                    and e.room == "support"
                    and e.name != "carol"
                )
            )
            assert isinstance(joined, chatkit.Joined)
            assert joined.name.startswith("guest")
            carol.say("how can I help?", "support")
            expect(page.locator("#log li")).to_have_text(["carol: how can I help?"])
            page.locator("#text").fill("my <b>order</b>")
            page.locator("#text").press("Enter")
            expect(page.locator("#log li")).to_have_text(
                ["carol: how can I help?", f"{joined.name}: my <b>order</b>"]
            )
            assert errors == []
        finally:
            context.close()


def test_a_name_taken_is_shown_and_another_can_be_picked(
    start_server, open_user, pages
) -> None:
    server = start_server()
    open_user(server.port, "carol")
    page = pages(server.url)
    page.submit_name("Carol")  # names are unique regardless of case
    expect(page.by("login-error")).to_have_text("That name is taken. Pick another one.")
    expect(page.by("app")).to_be_hidden()
    page.submit_name("not a name!")
    expect(page.by("login-error")).to_contain_text("Names are 1 to 32")
    page.login("carol2")
    expect(page.by("me")).to_have_text("carol2")


def test_errors_from_the_server_are_shown(start_server, open_user, pages) -> None:
    server = start_server(
        "--plugin",
        "tests.web_plugins:NoShouting",
        "--rate-limit",
        "1",
        "--rate-burst",
        "8",
    )
    alice = pages(server.url).login("alice")
    alice.send("STOP SHOUTING", sent=False)
    expect(alice.by("toast")).to_contain_text("Not sent:")
    expect(alice.by("message-input")).to_have_value("STOP SHOUTING")  # kept
    alice.by("message-input").fill("")
    for n in range(12):
        alice.by("message-input").fill(f"quick {n}")
        alice.by("message-input").press("Enter")
    expect(alice.by("toast")).to_have_text(
        "You are sending too fast. Wait a moment and try again."
    )


def test_screenshots(start_server, open_user, pages, tmp_path: Path) -> None:
    """The pictures in docs/browsers.md, made here: written to docs/images
    with CHATKIT_WRITE_DOCS=1, else to tmp_path."""
    out = ROOT / "docs" / "images" if os.environ.get("CHATKIT_WRITE_DOCS") else tmp_path
    out.mkdir(parents=True, exist_ok=True)
    server = start_server()
    users = {name: open_user(server.port, name) for name in ("maria", "kenji", "sam")}
    for user in users.values():
        user.join("design")
    users["maria"].say("Morning! The new onboarding mockups are up.", "design")
    users["kenji"].say("Looks great. Can we make the sign-up button larger?", "design")
    users["sam"].say("Agreed, and the copy could be shorter on phones.", "design")
    users["maria"].say("Good points, I'll do both today.", "design")
    desktop = pages(server.url, 1280, 800).login("alex")
    desktop.join("releases")
    desktop.join("design")
    desktop.send("Thanks! Ship it after lunch?")
    desktop.expect_text("Thanks! Ship it after lunch?")
    users["kenji"].say("Ship it.", "design")
    desktop.expect_text("Ship it.")
    users["sam"].dm("alex", "Got a minute for the release notes?")
    expect(desktop.by("unread-sam")).to_have_text("1")
    users["maria"].say("v2.3 is tagged.", "lobby")
    expect(desktop.by("unread-lobby")).to_have_text("1")
    desktop.page.mouse.move(0, 0)
    desktop.page.screenshot(path=str(out / "web-desktop.png"))

    phone = pages(server.url, 375, 740).login("lee")
    phone.join("design")
    phone.expect_text("Ship it.")
    phone.page.mouse.move(0, 0)
    phone.page.screenshot(path=str(out / "web-phone.png"))
    assert (out / "web-desktop.png").stat().st_size > 10_000
    assert (out / "web-phone.png").stat().st_size > 10_000
