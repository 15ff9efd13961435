"""Helpers of the browser tests (tests/test_browser.py): the server as a
subprocess with a web port, a TCP ChatClient on a thread of its own, and
the chat page driven through Playwright's sync API in Debian's chromium.

The tests are synchronous (Playwright's sync API runs its own event loop,
which trio's cannot share), so the server is a plain ``subprocess.Popen``
read by a thread, and the TCP client runs ``trio.run`` on a thread,
called into with ``trio.from_thread``.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import trio
from playwright.sync_api import Browser, Page, expect

import chatkit

from .programs import child_environment

T = TypeVar("T")

CHROMIUM = "/usr/bin/chromium"  # Debian's; never a downloaded browser
TIMEOUT = 10.0  # seconds any one wait may take
STARTED = re.compile(r"^Server started on 127\.0\.0\.1:(\d+)$")
WEB = re.compile(r"^Web chat on (http://127\.0\.0\.1:(\d+)/)$")


class WebServer:
    """``python -m chatkit.server`` with a web port, on 127.0.0.1, its
    history in ``db`` (``None``: in memory). Killed (its whole process
    group) by :meth:`kill`."""

    def __init__(self, cwd: Path, db: Path | None, *extra: str) -> None:
        self.cwd = cwd
        self.db = db
        self.extra = extra
        self.port = 0  # the TCP port, once started
        self.web_port = 0
        self.url = ""
        self.output: list[str] = []
        self.process: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()

    def start(self) -> WebServer:
        """Start on the ports of the previous start (a restart), or free
        ones; returns once both ports are announced."""
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "chatkit.server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--web-port",
                str(self.web_port),
                *(["--db", str(self.db)] if self.db else ["--no-db"]),
                "--no-interactive",
                *self.extra,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=self.cwd,
            env=child_environment(),
            start_new_session=True,  # its own process group, killed whole
        )
        self._lines = queue.Queue()
        threading.Thread(
            target=self._read, args=(self.process, self._lines), daemon=True
        ).start()
        self.port = int(self.expect(STARTED).group(1))
        web = self.expect(WEB)
        self.url, self.web_port = web.group(1), int(web.group(2))
        return self

    def _read(
        self, process: subprocess.Popen[str], lines: queue.Queue[str | None]
    ) -> None:
        assert process.stdout is not None
        with process.stdout:
            for line in process.stdout:
                lines.put(line.rstrip("\n"))
        lines.put(None)

    def expect(
        self, pattern: re.Pattern[str], within: float = TIMEOUT
    ) -> re.Match[str]:
        """Read the server's output until a line matches ``pattern``."""
        deadline = time.monotonic() + within
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no line matching {pattern.pattern!r} in {within}s: {self.output}"
                ) from None
            if line is None:
                raise AssertionError(f"the server ended: {self.output}")
            self.output.append(line)
            match = pattern.search(line)
            if match:
                return match

    def stop(self) -> None:
        """Stop it as Ctrl-C does (clients are sent ``shutdown``); kill it
        if it takes longer than the timeout."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"the server did not stop on SIGINT: {self.output}"
            ) from None

    def kill(self) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(TIMEOUT)


class TcpUser:
    """A :class:`chatkit.ChatClient` over TCP (JSON lines), run by
    ``trio.run`` on a thread of its own. Its events are kept in
    :attr:`events`; its methods call the client's from this thread."""

    def __init__(self, port: int, name: str) -> None:
        self.name = name
        self.events: list[chatkit.ClientItem] = []
        self._lock = threading.Lock()
        self._client: chatkit.ChatClient | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(port,), daemon=True)
        self._thread.start()
        if not self._ready.wait(TIMEOUT):
            raise AssertionError(f"{name} did not connect in {TIMEOUT}s")
        if self._error is not None:
            raise self._error

    def _run(self, port: int) -> None:
        try:
            trio.run(self._main, port)
        except BaseException as exc:  # handed to the test's thread
            self._error = exc
            self._ready.set()

    async def _main(self, port: int) -> None:
        async with chatkit.open_client("127.0.0.1", port, name=self.name) as client:
            self._client = client
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._collect, client)
                self._ready.set()
                await self._stop.wait()
                nursery.cancel_scope.cancel()

    async def _collect(self, client: chatkit.ChatClient) -> None:
        async for event in client:
            with self._lock:
                self.events.append(event)

    def _call(self, function: Callable[..., Awaitable[T]], *args: Any) -> T:
        assert self._token is not None
        return trio.from_thread.run(function, *args, trio_token=self._token)

    @property
    def client(self) -> chatkit.ChatClient:
        assert self._client is not None
        return self._client

    def say(self, text: str, room: str = chatkit.LOBBY) -> chatkit.Message:
        return self._call(self.client.say, text, room)

    def join(self, room: str) -> None:
        self._call(self.client.join, room)

    def leave(self, room: str) -> None:
        self._call(self.client.leave, room)

    def dm(self, to: str, text: str) -> chatkit.DirectMessage:
        return self._call(self.client.dm, to, text)

    def wait_for(
        self, check: Callable[[chatkit.ClientItem], bool]
    ) -> chatkit.ClientItem:
        """The first event (seen so far or to come) for which ``check`` holds."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            with self._lock:
                for event in self.events:
                    if check(event):
                        return event
            time.sleep(0.02)
        raise AssertionError(f"{self.name}: no such event in {TIMEOUT}s: {self.events}")

    def close(self) -> None:
        """Log out and end the thread (idempotent)."""
        if self._thread.is_alive() and self._stop is not None and self._token:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), f"{self.name}'s thread did not end"


class ChatPage:
    """The chat page in a browser context of its own (its own storage)."""

    def __init__(self, page: Page, url: str) -> None:
        self.page = page
        self.url = url
        self.dialogs: list[str] = []  # alert()s etc.: there must be none
        self.errors: list[str] = []  # uncaught exceptions in the page
        page.on("dialog", self._dialog)
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.set_default_timeout(TIMEOUT * 1000)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def by(self, testid: str) -> Any:
        return self.page.get_by_test_id(testid)

    def open(self) -> ChatPage:
        self.page.goto(self.url)
        return self

    def login(self, name: str) -> ChatPage:
        """Log in as ``name`` and wait for the lobby."""
        self.submit_name(name)
        expect(self.by("title")).to_have_text("#lobby")
        return self

    def submit_name(self, name: str) -> None:
        self.by("login-name").fill(name)
        self.by("login-submit").click()

    def send(self, text: str, sent: bool = True) -> None:
        """Type ``text`` in the composer and press Enter (and, if ``sent``,
        wait until the composer is empty again)."""
        self.by("message-input").fill(text)
        self.by("message-input").press("Enter")
        if sent:
            expect(self.by("message-input")).to_have_value("")

    def join(self, room: str) -> None:
        """Join ``room`` through the sidebar's field; it becomes current."""
        self.open_sidebar()
        self.by("join-input").fill(room)
        self.by("join-input").press("Enter")
        expect(self.by("title")).to_have_text(f"#{room}")

    def switch(self, testid: str) -> None:
        """Show conversation ``room-NAME`` or ``dm-NAME`` of the sidebar."""
        self.open_sidebar()
        self.by(testid).click()

    def open_sidebar(self) -> None:
        if (
            self.by("menu-button").is_visible()
            and not self.by("join-input").is_visible()
        ):
            self.by("menu-button").click()
            expect(self.by("join-input")).to_be_visible()

    def texts(self) -> list[str]:
        """The texts of the messages shown, top to bottom."""
        result: list[str] = self.by("message-text").all_text_contents()
        return result

    def expect_text(self, text: str) -> None:
        """Until a message with exactly ``text`` is shown."""
        exactly = re.compile(f"^{re.escape(text)}$")
        expect(self.by("message-text").filter(has_text=exactly)).to_have_count(1)


def new_page(
    browser: Browser, url: str, width: int = 1280, height: int = 800
) -> ChatPage:
    """The chat page in a new context (storage of its own)."""
    context = browser.new_context(viewport={"width": width, "height": height})
    return ChatPage(context.new_page(), url).open()
