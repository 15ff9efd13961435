"""The terminal client's moderation commands (``/kick``, ``/ban``, ``/mute``,
``/bans``...) as a person sees them on a pty (tests/terminal.py), and in
piped mode; plus the duration words they take."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import pytest

from chatkit.client.__main__ import HELP
from chatkit.client._moderating import parse_duration, parse_modes
from tests.programs import Launch, start_client, start_server
from tests.terminal import OpenTerminal, Terminal, open_chat


@pytest.mark.parametrize(
    ("word", "seconds"),
    [("30s", 30), ("10m", 600), ("2h", 7200), ("1d", 86400), ("1W", 604800)],
)
def test_durations(word: str, seconds: int) -> None:
    assert parse_duration(word) == seconds


@pytest.mark.parametrize("word", ["", "10", "0m", "m", "1.5h", "-1h", "10y", "99999d"])
def test_no_durations(word: str) -> None:
    assert parse_duration(word) is None


def test_help_lists_the_moderation_commands() -> None:
    commands = [line.split()[0] for line in HELP.splitlines() if line[:3] == "  /"]
    for command in ("/kick", "/ban", "/unban", "/mute", "/unmute", "/op", "/deop"):
        assert command in commands
    assert "/bans" in commands
    for command in ("/topic", "/mode", "/invite", "/voice", "/devoice"):
        assert command in commands


@pytest.mark.parametrize(
    ("words", "changes"),
    [
        (["+i"], {"invite_only": True}),
        (["-m", "+s"], {"moderated": False, "secret": True}),
        (["+im"], {"invite_only": True, "moderated": True}),
        (["limit=20", "slow=10"], {"limit": 20, "slow": 10}),
        (["slow=1m"], {"slow": 60}),
        (["slow=0"], {"slow": 0}),
    ],
)
def test_mode_words(words: list[str], changes: dict[str, object]) -> None:
    assert parse_modes(words) == changes


@pytest.mark.parametrize(
    "words", [[], ["i"], ["+x"], ["+"], ["limit=-1"], ["limit=x"], ["slow=2d"], ["n=1"]]
)
def test_no_mode_words(words: list[str]) -> None:
    assert parse_modes(words) is None


async def screen(
    terminal: OpenTerminal, port: int, name: str, *, lines: int = 24
) -> Terminal:
    """``name``'s chat on a terminal, logged in with ``--name``, without
    time stamps."""
    return await open_chat(
        terminal, port, name, "--no-timestamps", type_name=False, lines=lines
    )


async def root_and_bob(
    launch: Launch, terminal: OpenTerminal
) -> tuple[Terminal, Terminal]:
    """A server where ``root`` is an operator; root on a terminal, then bob."""
    _server, port = await start_server(launch, "--operator", "root")
    return await screen(terminal, port, "root"), await screen(terminal, port, "bob")


async def test_an_operator_kicks_and_both_screens_show_it(
    launch: Launch, terminal: OpenTerminal
) -> None:
    root, bob = await root_and_bob(launch, terminal)
    await root.wait_for("bob has joined the chat.")
    bob.type("/join dev\r")
    await bob.wait_for("[dev]>")
    root.type("/join dev\r")
    await root.wait_for("[dev]>")
    await bob.wait_for("root has joined dev.")
    root.type("/kick bob flooding the room\r")
    await root.wait_for("* You kicked bob from dev: flooding the room")
    await bob.wait_for("* root kicked you from dev: flooding the room")
    # bob stays connected, out of dev: he talks in the lobby again.
    await bob.wait_for("[lobby]>")
    bob.type("/who dev\r")
    await bob.wait_for("In dev: root")
    # A server kick: bob is disconnected with the reason.
    root.type("/kick -s bob enough\r")
    await root.wait_for("* You kicked bob off the server: enough")
    await bob.wait_for("enough")
    assert await bob.wait_exit() == 0


async def test_help_and_a_refusal_on_the_screen(
    launch: Launch, terminal: OpenTerminal
) -> None:
    _server, port = await start_server(launch, "--operator", "root")
    alice = await screen(terminal, port, "alice", lines=60)
    alice.type("/help\r")
    await alice.wait_for("/bans [-s]")
    text = alice.text()
    for line in HELP.splitlines():
        if line.startswith(("  /kick", "  /ban", "  /mute", "  /op", "  /deop")):
            assert line.rstrip() in text
    # No operator: refused, as the client shows errors.
    alice.type("/ban -s bob 10m spam\r")
    await alice.wait_for("(forbidden)")
    # A command used wrongly shows its usage.
    alice.type("/op\r")
    await alice.wait_for("Usage:\n  /op NAME")


def found(term: Terminal, pattern: str) -> re.Match[str] | None:
    """The last row of the screen that matches ``pattern`` (a regex,
    searched), as for a line with the time in it."""
    matches = (re.search(pattern, row) for row in reversed(term.rows()))
    return next((match for match in matches if match), None)


def matching(pattern: str) -> Callable[[Terminal], bool]:
    """For ``wait_for``: a row of the screen matches ``pattern``."""
    return lambda term: found(term, pattern) is not None


def clocks(seconds: int, since: float) -> set[str]:
    """The local ``HH:MM`` ``seconds`` from some time between ``since`` and
    now (the minute may turn meanwhile)."""
    return {
        time.strftime("%H:%M", time.localtime(t + seconds))
        for t in (since, time.time())
    }


def count(term: Terminal, line: str) -> int:
    """How many times ``line`` was shown, scrolled off or on the screen."""
    return term.transcript().count(line)


async def in_dev(*people: Terminal) -> None:
    """Each of ``people`` joins dev, in turn, and talks there."""
    for person in people:
        person.type("/join dev\r")
        await person.wait_for("[dev]>")


async def test_a_topic_is_set_and_shown_on_joining(
    launch: Launch, terminal: OpenTerminal
) -> None:
    _server, port = await start_server(launch, "--operator", "root")
    root = await screen(terminal, port, "root")
    await in_dev(root)
    root.type("/topic\r")
    await root.wait_for("No topic in dev.")
    root.type("/topic release on  Friday\r")  # shown as typed
    await root.wait_for("* You set the topic of dev: release on  Friday")
    # bob, joining later, is shown the topic as he joins.
    bob = await screen(terminal, port, "bob")
    await in_dev(bob)
    await bob.wait_for("You joined dev.\nTopic of dev: release on  Friday\n")
    await root.wait_for("bob has joined dev.")
    bob.type("/topic\r")
    await bob.wait_for("Topic of dev: release on  Friday (set by root)")
    # A change while he is there: he sees who made it.
    root.type("/topic ship it\r")
    await bob.wait_for("* root set the topic of dev: ship it")
    await root.wait_for("* You set the topic of dev: ship it")


async def test_an_invite_only_room_refuses_until_an_invite(
    launch: Launch, terminal: OpenTerminal
) -> None:
    root, bob = await root_and_bob(launch, terminal)
    await in_dev(root)
    root.type("/mode +i\r")
    await root.wait_for("* You set modes of dev: +i")
    bob.type("/join dev\r")
    refused = "Error: dev is invite-only: ask an operator for an invite (forbidden)"
    await bob.wait_for(refused)
    # Still out of dev, talking in lobby (the prompt is set before the next
    # line typed is acted on).
    bob.type("/room dev\r")
    await bob.wait_for("You are not in dev; /join dev first.")
    assert bob.rows()[bob.cursor[0]] == "[lobby]>"
    assert count(bob, refused) == 1
    assert "bob has joined dev." not in root.transcript()
    root.type("/invite bob\r")
    await root.wait_for("* You invited bob to dev")
    await bob.wait_for("* root invited you to dev")
    bob.type("/join dev\r")
    await bob.wait_for("You joined dev.")
    await bob.wait_for("[dev]>")
    await root.wait_for("bob has joined dev.")
    assert count(bob, refused) == 1


async def test_a_moderated_room_and_a_voice(
    launch: Launch, terminal: OpenTerminal
) -> None:
    root, bob = await root_and_bob(launch, terminal)
    await in_dev(root, bob)
    await root.wait_for("bob has joined dev.")
    root.type("/mode +m\r")
    await root.wait_for("* You set modes of dev: +m")
    await bob.wait_for("* root set modes of dev: +m")
    refused = "Error: dev is moderated: only operators and voiced members speak (muted)"
    bob.type("may I?\r")
    await bob.wait_for(refused)
    root.type("/voice bob\r")
    await root.wait_for("* You gave bob a voice in dev")
    await bob.wait_for("* root gave you a voice in dev")
    bob.type("thank you\r")
    await root.wait_for("[dev] bob: thank you")
    root.type("/devoice bob\r")
    await root.wait_for("* You took bob's voice in dev")
    await bob.wait_for("* root took your voice in dev")
    bob.type("one more thing\r")
    await bob.wait_for(lambda term: count(term, refused) == 2)
    # Unmoderated again, bob speaks: the server takes his lines in order, so
    # root is shown this one after any of the refused ones it was sent.
    root.type("/mode -m\r")
    await bob.wait_for("* root set modes of dev: none")
    bob.type("free again\r")
    await root.wait_for("[dev] bob: free again")
    said = [row for row in root.transcript() if row.startswith("[dev] bob: ")]
    assert said == ["[dev] bob: thank you", "[dev] bob: free again"]


async def test_a_mute_on_both_screens_and_in_bans(
    launch: Launch, terminal: OpenTerminal
) -> None:
    root, bob = await root_and_bob(launch, terminal)
    await root.wait_for("bob has joined the chat.")
    since = time.time()
    root.type("/mute bob 10m be nice\r")
    muted = r"^\* {} in lobby until (\d\d:\d\d): be nice$"
    await root.wait_for(matching(muted.format("You muted bob")))
    await bob.wait_for(matching(muted.format("root muted you")))
    for term, who in ((root, "You muted bob"), (bob, "root muted you")):
        match = found(term, muted.format(who))
        assert match is not None and match[1] in clocks(600, since)
    bob.type("hello all\r")
    refused = "Error: you are muted in lobby: be nice (muted)"
    await bob.wait_for(refused)
    root.type("/bans\r")
    await root.wait_for("Bans in lobby: none")
    await root.wait_for(
        matching(r"^Mutes in lobby: bob \(by root, until \d\d:\d\d: be nice\)$")
    )
    root.type("/unmute bob\r")
    await root.wait_for("* You unmuted bob in lobby")
    await bob.wait_for("* root unmuted you in lobby")
    # The server takes bob's lines in order: root would have been shown
    # "hello all" before this one.
    bob.type("hello again\r")
    await root.wait_for("bob: hello again")
    said = [row for row in root.transcript() if row.startswith("bob: ")]
    assert said == ["bob: hello again"]
    assert count(bob, refused) == 1
    root.type("/bans\r")
    await root.wait_for("Mutes in lobby: none")


async def test_a_plugin_command_answers_on_the_screen(
    launch: Launch, terminal: OpenTerminal
) -> None:
    _server, port = await start_server(launch, "--plugin", "examples.dice:Dice")
    alice = await screen(terminal, port, "alice")
    bob = await screen(terminal, port, "bob")
    await alice.wait_for("bob has joined the chat.")
    alice.type("/roll 2d6\r")
    rolled = r"^alice rolled 2d6: ([1-6]) \+ ([1-6]) = (\d+)$"
    await alice.wait_for(matching(rolled))
    match = found(alice, rolled)
    assert match is not None and int(match[1]) + int(match[2]) == int(match[3])
    alice.type("/roll lots\r")
    await alice.wait_for("alice, I can't read 'lots': try /roll 2d6")
    alice.type("/bogus\r")
    await alice.wait_for("Unknown command /bogus. Type /help for commands.")
    # The answers are alice's alone: bob sees her next line, and no roll.
    alice.type("done\r")
    await bob.wait_for("alice: done")
    assert not [row for row in bob.transcript() if "rolled" in row]


async def test_ban_mute_and_bans_piped(launch: Launch) -> None:
    # Scripted moderation: the transcript says what happened, plainly.
    _server, port = await start_server(launch, "--operator", "root")
    eve = await start_client(launch, port, "eve")
    root = await launch("client", "--port", str(port), "--name", "root")
    await root.send(
        "/mute eve 10m be nice\n/bans\n/unmute eve\n"
        "/ban 203.0.113.0/24 1h\n/ban -s eve spam\n"
    )
    await eve.expect(r"^\* root muted you in lobby until \d\d:\d\d: be nice$")
    await eve.expect(r"^\* root unmuted you in lobby$")
    await eve.expect(r"^Error: you are banned from this server: spam \(banned\)$")
    assert await eve.wait() == 0
    await root.expect(r"^Mutes in lobby: eve \(by root, until \d\d:\d\d: be nice\)$")
    await root.expect(r"^\* You banned 203\.0\.113\.0/24 from lobby until \d\d:\d\d$")
    await root.expect(r"^\* You banned eve from the server: spam$")
    await root.close_stdin()
    assert await root.wait() == 0


async def test_topic_mode_invite_voice_and_plugin_commands_piped(
    launch: Launch,
) -> None:
    _server, port = await start_server(
        launch, "--operator", "root", "--plugin", "examples.dice:Dice"
    )
    bob = await start_client(launch, port, "bob")
    root = await launch("client", "--port", str(port), "--name", "root")
    await root.send(
        "/join dev\n/topic\n/topic release on  Friday\n/topic\n"
        "/mode\n/mode +im slow=10\n/mode bogus\n/invite bob\n"
        "/roll 2d6\n/bogus\n"
    )
    await root.expect(r"^You joined dev\.$")
    await root.expect(r"^No topic in dev\.$")
    await root.expect(r"^\* You set the topic of dev: release on  Friday$")
    await root.expect(r"^Topic of dev: release on  Friday \(set by root\)$")
    await root.expect(r"^Modes of dev: none$")
    await root.expect(r"^\* You set modes of dev: \+im slow=10$")
    await root.expect(r"^  /mode \[\+i")  # its usage
    await root.expect(r"^\* You invited bob to dev$")
    await root.expect(r"^root rolled 2d6: \d+ \+ \d+ = \d+$")
    await root.expect(r"^Unknown command /bogus\. Type /help for commands\.$")
    await bob.expect(r"^\* root invited you to dev$")
    await bob.send("/join dev\n/mode\nhello?\n")
    await bob.expect(r"^You joined dev\.$")
    await bob.expect(r"^Topic of dev: release on  Friday$")
    await bob.expect(r"^Modes of dev: \+im slow=10$")
    await bob.expect(r"^Error: .* \(muted\)$")
    await root.send("/voice bob\n/devoice bob\n/mode -im slow=0\n/topic\n")
    await bob.expect(r"^\* root gave you a voice in dev$")
    await bob.expect(r"^\* root took your voice in dev$")
    await bob.expect(r"^\* root set modes of dev: none$")
    await root.expect(r"^\* You gave bob a voice in dev$")
    await root.close_stdin()
    assert await root.wait() == 0
    await bob.close_stdin()
    assert await bob.wait() == 0
