"""chatkit.auth: the shared-token and password-file authenticators.

Logins are tried against a real server on 127.0.0.1 (``open_chat``), in JSON
mode with the bundled client and by hand, and in line mode. A refused client
must get one ``error unauthorized`` and nothing else (no welcome, joins,
messages or history) before being disconnected, and nobody else may hear
of it. Then the password file: its format, its errors, reloading, the
``python -m chatkit.auth add`` command, and the constant-time comparisons.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import stat
import subprocess
import sys
import time
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import chatkit
from chatkit import auth
from chatkit.testing import Chat, open_chat
from tests.conftest import OpenRaw

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "correct horse battery staple"


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    """A password file for alice (``wonderland``) and Bob (``builder``)."""
    path = tmp_path / "passwd"
    auth.add_user(path, "alice", "wonderland")
    auth.add_user(path, "Bob", "builder")
    return path


@pytest.fixture
def compare_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bytes, bytes]]:
    """Records every ``hmac.compare_digest`` call (still comparing)."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def recording(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    return calls


def make_plugin(kind: str, password_file: Path) -> object:
    if kind == "token":
        return auth.TokenAuth(TOKEN)
    return auth.PasswordFileAuth(password_file)


def secret(kind: str) -> str:
    """What alice sends as ``token`` under each plugin."""
    return TOKEN if kind == "token" else "wonderland"


REASON = {"token": auth.INVALID_TOKEN, "password": auth.INVALID_LOGIN}
KINDS = ["token", "password"]


async def mark(chat: Chat, name: str) -> int:
    """How many events ``name`` received, once everything in flight to it
    has arrived and been recorded."""
    # The server answers the ping after everything it queued for ``name``
    # before; then the chat's recorder gets to the end of it.
    await chat[name].ping()
    await trio.sleep(0.05)
    await trio.testing.wait_all_tasks_blocked()
    return len(chat.received(name))


async def settle(chat: Chat, name: str, since: int) -> None:
    """Check that ``name`` received nothing after its first ``since`` events,
    everything in flight included."""
    assert chat.received(name)[since : await mark(chat, name)] == ()


# --- admitted and refused --------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_the_right_secret_gets_in(kind: str, password_file: Path) -> None:
    async with open_chat(plugins=[make_plugin(kind, password_file)]) as chat:
        alice = await chat.connect("alice", token=secret(kind))
        message = await alice.say("hi")
        assert message.text == "hi"
        assert [u.name for u in chat.server.users] == ["alice"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("token", [None, "", "wrong", TOKEN + "x", TOKEN[:-1]])
async def test_a_wrong_or_missing_secret_is_refused(
    kind: str, token: str | None, password_file: Path
) -> None:
    async with open_chat(plugins=[make_plugin(kind, password_file)]) as chat:
        bob = await chat.connect("bob", token=TOKEN if kind == "token" else "builder")
        seen = await mark(chat, "bob")
        with pytest.raises(chatkit.Unauthorized) as refused:
            await chat.connect("alice", token=token)
        assert refused.value.message == REASON[kind]
        assert [u.name for u in chat.server.users] == ["bob"]
        await settle(chat, "bob", since=seen)
        assert await bob.who() == ("bob",)


async def test_password_names_ignore_case(password_file: Path) -> None:
    async with open_chat(plugins=[auth.PasswordFileAuth(password_file)]) as chat:
        # The file says "Bob"; chat names are case-insensitive.
        bob = await chat.connect("BOB", token="builder")
        assert bob.name == "BOB"
        with pytest.raises(chatkit.Unauthorized):
            await chat.connect("ALICE", token="Wonderland")  # passwords do not
        await chat.connect("Alice", token="wonderland")


async def test_unknown_user_and_wrong_password_look_the_same(
    password_file: Path, open_raw: OpenRaw
) -> None:
    async with open_chat(plugins=[auth.PasswordFileAuth(password_file)]) as chat:
        answers = []
        for name, password in [("alice", "guess"), ("mallory", "wonderland")]:
            client = await open_raw(chat.port)
            await client.send_json(
                type="hello", name=name, protocol=1, token=password, ref=1
            )
            answers.append(await client.assert_closed())
        assert answers[0] == answers[1]
        assert [json.loads(line) for line in answers[0]] == [
            {
                "type": "error",
                "code": "unauthorized",
                "message": "invalid name or password",
                "ref": 1,
            }
        ]


@pytest.mark.parametrize("kind", KINDS)
async def test_a_refused_client_receives_nothing_but_the_refusal(
    kind: str, password_file: Path, open_raw: OpenRaw
) -> None:
    async with open_chat(plugins=[make_plugin(kind, password_file)]) as chat:
        bob = await chat.connect("bob", token=TOKEN if kind == "token" else "builder")
        await bob.join("secrets")
        await bob.say("the plan", room="secrets")
        await bob.say("lobby talk")
        history_before = await bob.history("lobby")
        seen = await mark(chat, "bob")

        intruder = await open_raw(chat.port)
        # Everything in one packet: whatever the server does with the
        # requests behind the refused hello, none of them may be answered.
        requests = [
            {"type": "hello", "name": "mallory", "protocol": 1, "token": "guess"},
            {"type": "history", "room": "lobby"},
            {"type": "join", "room": "secrets"},
            {"type": "history", "room": "secrets"},
            {"type": "who", "room": "secrets"},
            {"type": "rooms"},
            {"type": "say", "text": "let me in"},
            {"type": "dm", "to": "bob", "text": "psst"},
        ]
        await intruder.send_bytes(
            b"".join(json.dumps(r).encode() + b"\n" for r in requests)
        )
        lines = await intruder.assert_closed()
        assert [json.loads(line) for line in lines] == [
            {"type": "error", "code": "unauthorized", "message": REASON[kind]}
        ]
        # Nobody heard of the intruder, and it left nothing behind.
        await settle(chat, "bob", since=seen)
        assert chat.server.get_user("mallory") is None
        assert await bob.who("secrets") == ("bob",)
        assert await bob.history("lobby") == history_before


@pytest.mark.parametrize("kind", KINDS)
async def test_a_refused_client_cannot_learn_who_is_online(
    kind: str, password_file: Path, open_raw: OpenRaw
) -> None:
    # Whether a name is in use is checked after the secret: asking for an
    # online user's name with a wrong secret is refused like any other.
    async with open_chat(plugins=[make_plugin(kind, password_file)]) as chat:
        await chat.connect("alice", token=secret(kind))
        answers = []
        for name in ["ALICE", "nobody"]:
            client = await open_raw(chat.port)
            await client.send_json(
                type="hello", name=name, protocol=1, token="guess", ref=1
            )
            answers.append(await client.assert_closed())
        assert answers[0] == answers[1]
        assert [json.loads(line)["code"] for line in answers[0]] == ["unauthorized"]


@pytest.mark.parametrize("kind", KINDS)
async def test_before_hello_only_not_ready_comes_back(
    kind: str, password_file: Path, open_raw: OpenRaw
) -> None:
    async with open_chat(plugins=[make_plugin(kind, password_file)]) as chat:
        bob = await chat.connect("bob", token=TOKEN if kind == "token" else "builder")
        await bob.say("before you came")
        seen = await mark(chat, "bob")
        client = await open_raw(chat.port)
        await client.send_json(type="ping", ref=0)  # JSON mode, no hello yet
        for number, request in enumerate(
            [
                {"type": "history", "room": "lobby"},
                {"type": "join", "room": "lobby"},
                {"type": "who"},
                {"type": "rooms"},
                {"type": "say", "text": "hi"},
                {"type": "dm", "to": "bob", "text": "hi"},
            ],
            start=1,
        ):
            await client.send_json(**request, ref=number)
        answers = [await client.receive_json() for _ in range(7)]
        assert [(a["type"], a["code"], a["ref"]) for a in answers] == [
            ("error", "not_ready", number) for number in range(7)
        ]
        await client.send_json(type="hello", name="mallory", protocol=1, token="no")
        lines = await client.assert_closed()
        assert [json.loads(line)["code"] for line in lines] == ["unauthorized"]
        await settle(chat, "bob", since=seen)


@pytest.mark.parametrize("kind", KINDS)
async def test_line_mode_users_are_refused(
    kind: str, password_file: Path, open_raw: OpenRaw
) -> None:
    # Line mode has no way to send a token: with authentication on, nc and
    # the original chat program's clients cannot log in.
    async with open_chat(plugins=[make_plugin(kind, password_file)]) as chat:
        bob = await chat.connect("bob", token=TOKEN if kind == "token" else "builder")
        seen = await mark(chat, "bob")
        client = await open_raw(chat.port)
        await client.send_bytes(b"alice\nhello everyone\nexit\n")
        assert await client.assert_closed() == [f"error (unauthorized): {REASON[kind]}"]
        await settle(chat, "bob", since=seen)
        assert chat.server.get_user("alice") is None
        assert await bob.history("lobby") == ()


# --- TokenAuth -------------------------------------------------------------------


def test_token_auth_compares_bytes_in_constant_time(
    compare_calls: list[tuple[bytes, bytes]],
) -> None:
    plugin = auth.TokenAuth("sésame")
    plugin.chatkit_authenticate(token="sésame")
    with pytest.raises(chatkit.Veto, match=r"^invalid token$"):
        plugin.chatkit_authenticate(token="sesame")
    assert compare_calls == [
        ("sésame".encode(), "sésame".encode()),
        (b"sesame", "sésame".encode()),
    ]


def test_token_auth_compares_both_tokens_whichever_matches(
    compare_calls: list[tuple[bytes, bytes]],
) -> None:
    # Both comparisons run for every login, so that the time does not say
    # which secret matched (or how close a guess came to either).
    plugin = auth.TokenAuth("plain", operator_token="boss")
    assert plugin.chatkit_authenticate(token="plain") is None
    assert plugin.chatkit_authenticate(token="boss") == chatkit.Login(operator=True)
    with pytest.raises(chatkit.Veto, match=r"^invalid token$"):
        plugin.chatkit_authenticate(token="guess")
    assert compare_calls == [
        (b"plain", b"plain"),
        (b"plain", b"boss"),
        (b"boss", b"plain"),
        (b"boss", b"boss"),
        (b"guess", b"plain"),
        (b"guess", b"boss"),
    ]


def test_token_auth_refuses_a_missing_token() -> None:
    with pytest.raises(chatkit.Veto, match=r"^invalid token$"):
        auth.TokenAuth("x").chatkit_authenticate(token=None)


def test_token_auth_needs_a_token() -> None:
    with pytest.raises(ValueError, match="empty"):
        auth.TokenAuth("")


@pytest.mark.parametrize(
    ("operator_token", "message"),
    [("", "the operator token is empty"), (TOKEN, "is the shared token")],
)
def test_token_auth_needs_a_distinct_operator_token(
    operator_token: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        auth.TokenAuth(TOKEN, operator_token=operator_token)


def test_token_auth_repr_hides_the_token() -> None:
    assert TOKEN not in repr(auth.TokenAuth(TOKEN))
    plugin = auth.TokenAuth(TOKEN, operator_token="operators only")
    assert "operators only" not in repr(plugin)
    assert repr(plugin) == "TokenAuth(<secret>, operator_token=<secret>)"


async def test_token_auth_goes_first_and_stops_the_chain() -> None:
    seen: list[str] = []

    class Observer:
        @chatkit.hookimpl
        def chatkit_authenticate(self, name: str) -> None:
            seen.append(name)

    # Listed first, yet it runs after TokenAuth (tryfirst), and never for a
    # refused user.
    async with open_chat(plugins=[Observer(), auth.TokenAuth(TOKEN)]) as chat:
        with pytest.raises(chatkit.Unauthorized):
            await chat.connect("mallory", token="guess")
        await chat.connect("alice", token=TOKEN)
    assert seen == ["alice"]


# --- PasswordFileAuth: checks ----------------------------------------------------


def test_password_checks_run_scrypt_and_compare_in_constant_time(
    password_file: Path, compare_calls: list[tuple[bytes, bytes]]
) -> None:
    plugin = auth.PasswordFileAuth(password_file)
    compare_calls.clear()
    assert plugin.check("alice", "wonderland")
    assert not plugin.check("alice", "Wonderland")
    # An unknown name and a missing password are checked against a dummy
    # hash: the same scrypt run and comparison, so the timing is the same.
    assert not plugin.check("mallory", "wonderland")
    assert not plugin.check("alice", None)
    assert len(compare_calls) == 4
    for derived, stored in compare_calls:
        assert isinstance(derived, bytes)
        assert isinstance(stored, bytes)
        assert len(derived) == len(stored) == auth.HASH_BYTES
    assert compare_calls[0][0] == compare_calls[0][1]


def test_password_refusals_share_one_reason(password_file: Path) -> None:
    plugin = auth.PasswordFileAuth(password_file)
    reasons = []
    for name, token in [("alice", "x"), ("mallory", "wonderland"), ("bob", None)]:
        with pytest.raises(chatkit.Veto) as refused:
            plugin.chatkit_authenticate(name=name, token=token)
        reasons.append(refused.value.reason)
    assert reasons == [auth.INVALID_LOGIN] * 3


def test_password_file_auth_reads_the_file_once_then_on_reload(
    password_file: Path,
) -> None:
    plugin = auth.PasswordFileAuth(password_file)
    assert plugin.names == {"alice", "bob"}
    auth.add_user(password_file, "carol", "singer")
    auth.add_user(password_file, "alice", "looking-glass")
    assert not plugin.check("carol", "singer")
    assert plugin.check("alice", "wonderland")
    plugin.reload()
    assert plugin.names == {"alice", "bob", "carol"}
    assert plugin.check("carol", "singer")
    assert plugin.check("alice", "looking-glass")
    assert not plugin.check("alice", "wonderland")


def test_a_failed_reload_keeps_the_current_users(password_file: Path) -> None:
    plugin = auth.PasswordFileAuth(password_file)
    password_file.write_text(password_file.read_text() + "garbage\n")
    with pytest.raises(ValueError, match=r":3: expected name:hash"):
        plugin.reload()
    assert plugin.check("alice", "wonderland")
    password_file.unlink()
    with pytest.raises(FileNotFoundError):
        plugin.reload()
    assert plugin.check("alice", "wonderland")


@pytest.mark.parametrize("pipelined", [False, True])
async def test_renaming_to_a_registered_name_is_refused(
    pipelined: bool, password_file: Path, open_raw: OpenRaw
) -> None:
    async with open_chat(plugins=[auth.PasswordFileAuth(password_file)]) as chat:
        bob = await chat.connect("bob", token="builder")
        alice = await open_raw(chat.port)
        await alice.hello("alice", token="wonderland")
        await alice.expect("joined", name="alice")
        await chat.expect("bob", chatkit.Joined, name="alice")
        # Renaming to an unregistered name is harmless; to Bob's is not.
        await alice.send_json(type="nick", name="alice2", ref=1)
        assert (await alice.receive_json())["type"] == "renamed"
        await chat.expect("bob", chatkit.Renamed, old="alice", new="alice2")
        await bob.nick("robert")
        assert (await alice.receive_json())["new"] == "robert"
        seen = await mark(chat, "bob")
        nick = b'{"type":"nick","name":"BOB","ref":2}\n'
        say = b'{"type":"say","text":"I am bob, honest","ref":3}\n'
        if pipelined:
            # A message right behind the nick, in the same packet.
            await alice.send_bytes(nick + say)
        else:
            await alice.send_bytes(nick)
            await alice.send_bytes(say)
        assert await alice.receive_json() == {
            "type": "error",
            "code": "rejected",
            "message": "BOB is a registered name",
            "ref": 2,
        }
        # The message goes out under the name alice still has.
        assert (await alice.receive_json())["from"] == "alice2"
        await chat.expect("bob", chatkit.Message, sender="alice2")
        assert chat.received("bob")[seen:] == (
            chatkit.Message(
                id=chat.received("bob")[-1].id,  # type: ignore[attr-defined]
                ts=chat.received("bob")[-1].ts,  # type: ignore[attr-defined]
                room="lobby",
                sender="alice2",
                text="I am bob, honest",
            ),
        )
        assert chat.server.get_user("BOB") is None
        assert chat.server.get_user("alice2") is not None


# --- hashes ----------------------------------------------------------------------


def test_hash_format_round_trip() -> None:
    encoded = auth.hash_password("wonderland")
    scheme, n, r, p, salt, digest = encoded.split("$")
    assert (scheme, n, r, p) == (
        "scrypt",
        str(auth.SCRYPT_N),
        str(auth.SCRYPT_R),
        str(auth.SCRYPT_P),
    )
    assert len(base64.b64decode(salt, validate=True)) == auth.SALT_BYTES == 16
    assert len(base64.b64decode(digest, validate=True)) == auth.HASH_BYTES
    assert auth.verify_password("wonderland", encoded)
    assert not auth.verify_password("wonderlanD", encoded)
    # A fresh salt every time.
    assert auth.hash_password("wonderland") != encoded


def test_a_hash_carries_its_own_parameters() -> None:
    encoded = auth.hash_password("pw", n=2**10, r=4, p=2)
    assert encoded.startswith("scrypt$1024$4$2$")
    assert auth.verify_password("pw", encoded)
    assert not auth.verify_password("pW", encoded)


def test_the_hash_is_standard_scrypt() -> None:
    # Anyone with hashlib (or OpenSSL, or another scrypt) can check it.
    _, n, r, p, salt, digest = auth.hash_password("wonderland").split("$")
    expected = base64.b64decode(digest)
    assert (
        hashlib.scrypt(
            b"wonderland",
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
        )
        == expected
    )


def test_passwords_are_normalised() -> None:
    composed = unicodedata.normalize("NFC", "café")
    decomposed = unicodedata.normalize("NFD", "café")
    assert composed != decomposed
    assert auth.verify_password(decomposed, auth.hash_password(composed))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"password": ""}, "empty"),
        ({"password": "x", "n": 1000}, "power of 2"),
        ({"password": "x", "n": 1}, "power of 2"),
        ({"password": "x", "r": 0}, "r must be"),
        ({"password": "x", "p": 0}, "p 1..16"),
        ({"password": "x", "n": 2**20}, "MiB"),
    ],
)
def test_hash_password_refuses_bad_input(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        auth.hash_password(**kwargs)


def test_verification_is_cheap_enough_for_the_event_loop() -> None:
    # The documented trade-off: a few milliseconds per check, in the loop.
    # Generous bound, for slow CI machines; docs/security.md has the
    # measurement.
    encoded = auth.hash_password("wonderland")
    times = []
    for _ in range(5):
        start = time.perf_counter()
        auth.verify_password("wonderland", encoded)
        times.append(time.perf_counter() - start)
    assert min(times) < 0.05


def test_the_docs_state_the_parameters() -> None:
    security = (ROOT / "docs/security.md").read_text()
    assert "## Authentication" in security
    assert f"scrypt${auth.SCRYPT_N}${auth.SCRYPT_R}${auth.SCRYPT_P}$" in security


# --- the password file -------------------------------------------------------------


GOOD = auth.hash_password("pw")


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ("alice\n", ":1: expected name:hash"),
        (f"# users\n\nal ice:{GOOD}\n", ":3: 'al ice' is not a valid chat name"),
        (f":{GOOD}\n", ":1: '' is not a valid chat name"),
        ("alice:sha1$abc\n", ":1: hash is not of the form scrypt$n$r$p$salt$hash"),
        ("alice:\n", ":1: hash is not of the form"),
        (
            "alice:" + GOOD.replace("$2048$", "$2000$") + "\n",
            ":1: scrypt n must be a power of 2",
        ),
        ("alice:" + GOOD.replace("$2048$", "$x$") + "\n", ":1: scrypt n, r and p"),
        (
            "alice:" + GOOD.replace("$2048$", "$1048576$") + "\n",
            ":1: scrypt n=1048576 r=8 p=1 needs more than 64 MiB",
        ),
        ("alice:scrypt$2048$8$1$!!!!$AAAA\n", ":1: salt and hash must be base64"),
        (
            "alice:scrypt$2048$8$1$AAAA$" + GOOD.rsplit("$", 1)[1] + "\n",
            ":1: salt must be at least 8 bytes",
        ),
        (f"alice:{GOOD}\nbob:{GOOD}\nALICE:{GOOD}\n", ":3: ALICE appears twice"),
        (f"alice:{GOOD}:admin\n", ":1: unknown role 'admin' (the one role is"),
        (f"alice:{GOOD}:Operator\n", ":1: unknown role 'Operator'"),
        (f"alice:{GOOD}:\n", ":1: unknown role ''"),
        (f"alice:{GOOD}:operator:x\n", ":1: expected name:hash or name:hash:ROLE"),
        ("alice:operator\n", ":1: hash is not of the form"),
    ],
)
def test_malformed_files_name_the_file_and_line(
    tmp_path: Path, content: str, error: str
) -> None:
    path = tmp_path / "passwd"
    path.write_text(content)
    with pytest.raises(ValueError) as raised:
        auth.PasswordFileAuth(path)
    assert str(raised.value).startswith(f"{path}{error}")


def test_an_entry_may_give_the_operator_role(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    path.write_text(f"root:{GOOD}:operator\nalice:{GOOD}\n  Bob:{GOOD}:operator  \n")
    plugin = auth.PasswordFileAuth(path)
    assert plugin.names == {"root", "alice", "bob"}
    assert plugin.operators == {"root", "bob"}
    assert plugin.check("root", "pw")  # the role does not change the password
    login = plugin.chatkit_authenticate(name="ROOT", token="pw")
    assert login == chatkit.Login(identified=True, operator=True)
    login = plugin.chatkit_authenticate(name="alice", token="pw")
    assert login == chatkit.Login(identified=True, operator=False)
    with pytest.raises(chatkit.Veto, match=auth.INVALID_LOGIN):
        plugin.chatkit_authenticate(name="root", token="wrong")


def test_reload_picks_up_role_changes(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    path.write_text(f"root:{GOOD}:operator\nalice:{GOOD}\n")
    plugin = auth.PasswordFileAuth(path)
    assert plugin.operators == {"root"}
    assert auth.set_operator(path, "root", False) is True
    assert auth.set_operator(path, "Alice", True) is True
    assert plugin.operators == {"root"}  # read once
    plugin.reload()
    assert plugin.operators == {"alice"}
    assert plugin.chatkit_authenticate(name="alice", token="pw").operator
    assert not plugin.chatkit_authenticate(name="root", token="pw").operator


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    path.write_bytes(b"\xff\xfe:junk\n")
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: not UTF-8 text"):
        auth.PasswordFileAuth(path)


def test_a_missing_file_is_an_oserror_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as raised:
        auth.PasswordFileAuth(path)
    assert raised.value.filename == str(path)


def test_comments_blank_lines_and_crlf_are_fine(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    path.write_bytes(
        f"# chatkit users\r\n\r\n  alice:{GOOD}  \r\n#bob:{GOOD}\r\n".encode()
    )
    plugin = auth.PasswordFileAuth(path)
    assert plugin.names == {"alice"}
    assert plugin.check("alice", "pw")


def test_add_user_rewrites_atomically_and_keeps_other_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "passwd"
    path.write_text(f"# staff\nalice:{GOOD}\n\nbob:{GOOD}\n")
    path.chmod(0o644)
    replaced: list[tuple[str, str]] = []
    real_replace = os.replace

    def recording(src: Any, dst: Any) -> None:
        replaced.append((os.fspath(src), os.fspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording)
    assert auth.add_user(path, "ALICE", "new") is True
    assert auth.add_user(path, "carol", "pw") is False
    [(tmp1, dst1), (tmp2, dst2)] = replaced
    assert dst1 == dst2 == str(path)
    assert Path(tmp1).parent == Path(tmp2).parent == tmp_path
    lines = path.read_text().splitlines()
    assert lines[0] == "# staff"
    assert lines[1].startswith("ALICE:scrypt$")
    assert lines[2:4] == ["", f"bob:{GOOD}"]
    assert lines[4].startswith("carol:scrypt$")
    assert len(lines) == 5
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["passwd"]
    plugin = auth.PasswordFileAuth(path)
    assert plugin.check("alice", "new")
    assert plugin.check("bob", "pw")


def test_add_user_keeps_gives_or_takes_the_role(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    auth.add_user(path, "root", "one", operator=True)
    auth.add_user(path, "alice", "two")
    root, alice = path.read_text().splitlines()
    assert root.startswith("root:scrypt$") and root.endswith("=:operator")
    assert alice.startswith("alice:scrypt$") and alice.endswith("=")
    assert auth.PasswordFileAuth(path).operators == {"root"}
    auth.add_user(path, "ROOT", "three")  # a new password keeps the role
    plugin = auth.PasswordFileAuth(path)
    assert plugin.operators == {"root"}
    assert plugin.check("root", "three")
    auth.add_user(path, "root", "four", operator=False)
    auth.add_user(path, "alice", "five", operator=True)
    assert auth.PasswordFileAuth(path).operators == {"alice"}
    lines = path.read_text().splitlines()
    assert lines[0].startswith("root:scrypt$")
    assert lines[0].count(":") == 1
    assert lines[1].startswith("alice:scrypt$")
    assert lines[1].endswith(":operator")


def test_set_operator_changes_the_role_alone(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    path.write_text(f"# staff\nAlice:{GOOD}\nbob:{GOOD}:operator\n")
    assert auth.set_operator(path, "alice", True) is True
    assert path.read_text() == f"# staff\nAlice:{GOOD}:operator\nbob:{GOOD}:operator\n"
    before = path.stat().st_mtime_ns, path.stat().st_ino
    assert auth.set_operator(path, "ALICE", True) is False  # so already
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == before  # not rewritten
    assert auth.set_operator(path, "bob", False) is True
    assert path.read_text() == f"# staff\nAlice:{GOOD}:operator\nbob:{GOOD}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    plugin = auth.PasswordFileAuth(path)
    assert plugin.check("alice", "pw") and plugin.check("bob", "pw")


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (f"alice:{GOOD}\n", "carol is not in "),
        (None, "carol is not in "),
        ("carol:oops\n", ":1: hash is not of the form"),
    ],
)
def test_set_operator_refuses_an_unknown_name_or_a_malformed_file(
    tmp_path: Path, content: str | None, error: str
) -> None:
    path = tmp_path / "passwd"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=error):
        auth.set_operator(path, "carol", True)
    assert (path.read_text() if content is not None else None) == content
    assert path.exists() == (content is not None)


def test_a_failed_write_leaves_the_file_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "passwd"
    path.write_text(f"alice:{GOOD}\n")

    def failing(src: Any, dst: Any) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="disk on fire"):
        auth.add_user(path, "alice", "new")
    assert path.read_text() == f"alice:{GOOD}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["passwd"]


def test_add_user_never_rewrites_a_malformed_file(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    path.write_text("alice:oops\n")
    with pytest.raises(ValueError, match=":1: hash is not of the form"):
        auth.add_user(path, "bob", "pw")
    assert path.read_text() == "alice:oops\n"


# --- python -m chatkit.auth --------------------------------------------------------


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chatkit.auth", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_cli_add_creates_the_file(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    result = run_cli("add", str(path), "alice", stdin="wonderland\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert result.stderr == f"added alice in {path}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    [line] = path.read_text().splitlines()
    name, _, encoded = line.partition(":")
    assert name == "alice"
    assert "wonderland" not in line
    assert auth.verify_password("wonderland", encoded)
    assert auth.PasswordFileAuth(path).check("alice", "wonderland")


def test_cli_add_updates_a_user(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    assert run_cli("add", str(path), "alice", stdin="one\n").returncode == 0
    assert run_cli("add", str(path), "bob", stdin="two").returncode == 0
    result = run_cli("add", str(path), "Alice", stdin="three\n")
    assert result.returncode == 0, result.stderr
    assert result.stderr == f"updated Alice in {path}\n"
    plugin = auth.PasswordFileAuth(path)
    assert plugin.names == {"alice", "bob"}
    assert plugin.check("alice", "three")
    assert not plugin.check("alice", "one")
    assert plugin.check("bob", "two")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["passwd"]


def test_cli_add_takes_a_cost(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    result = run_cli("add", "--scrypt-n", "4096", str(path), "alice", stdin="pw\n")
    assert result.returncode == 0, result.stderr
    assert "alice:scrypt$4096$8$1$" in path.read_text()


@pytest.mark.parametrize(
    ("args", "stdin", "error"),
    [
        (("bad name",), "pw\n", "error: 'bad name' is not a valid chat name\n"),
        (("alice",), "\n", "error: the password is empty\n"),
        (("alice",), "", "error: the password is empty\n"),
        (("--scrypt-n", "1000", "alice"), "pw\n", "error: scrypt n must be a power"),
    ],
)
def test_cli_add_refuses_bad_input(
    tmp_path: Path, args: tuple[str, ...], stdin: str, error: str
) -> None:
    path = tmp_path / "passwd"
    *options, name = args
    result = run_cli("add", *options, str(path), name, stdin=stdin)
    assert result.returncode == 1
    assert result.stderr.startswith(error)
    assert not path.exists()


def test_cli_add_refuses_a_malformed_file(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    path.write_text("alice\n")
    result = run_cli("add", str(path), "bob", stdin="pw\n")
    assert result.returncode == 1
    assert result.stderr == (f"error: {path}:1: expected name:hash or name:hash:ROLE\n")
    assert path.read_text() == "alice\n"


def test_cli_add_operator_and_op_deop(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    result = run_cli("add", "--operator", str(path), "root", stdin="pw\n")
    assert result.returncode == 0, result.stderr
    assert result.stderr == f"added root in {path} (a server operator)\n"
    assert run_cli("add", str(path), "alice", stdin="pw\n").returncode == 0
    assert auth.PasswordFileAuth(path).operators == {"root"}
    result = run_cli("op", str(path), "Alice")
    assert result.returncode == 0, result.stderr
    assert result.stderr == f"Alice is now a server operator in {path}\n"
    result = run_cli("op", str(path), "alice")
    assert result.stderr == f"alice was a server operator already in {path}\n"
    result = run_cli("deop", str(path), "root")
    assert result.stderr == f"root is no longer a server operator in {path}\n"
    result = run_cli("deop", str(path), "root")
    assert result.stderr == f"root was not a server operator in {path}\n"
    assert auth.PasswordFileAuth(path).operators == {"alice"}
    result = run_cli("add", "--no-operator", str(path), "alice", stdin="new\n")
    assert result.stderr == f"updated alice in {path} (not a server operator)\n"
    plugin = auth.PasswordFileAuth(path)
    assert plugin.operators == set()
    assert plugin.check("alice", "new") and plugin.check("root", "pw")


@pytest.mark.parametrize("command", ["op", "deop"])
def test_cli_op_and_deop_refuse_an_unknown_name(tmp_path: Path, command: str) -> None:
    path = tmp_path / "passwd"
    auth.add_user(path, "alice", "pw")
    before = path.read_text()
    result = run_cli(command, str(path), "carol")
    assert result.returncode == 1
    assert result.stderr == f"error: carol is not in {path}\n"
    result = run_cli(command, str(path), "bad name")
    assert result.returncode == 1
    assert result.stderr == "error: 'bad name' is not a valid chat name\n"
    assert path.read_text() == before


def test_cli_usage_errors_exit_2(tmp_path: Path) -> None:
    assert run_cli().returncode == 2
    assert run_cli("add", str(tmp_path / "passwd")).returncode == 2


@pytest.fixture
def tty(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """Pretend standard input is a terminal; ``tty("a", "b")`` sets what
    each ``getpass`` prompt returns."""
    answers: list[str] = []
    prompts: list[str] = []

    def fake_getpass(prompt: str = "Password: ", stream: object = None) -> str:
        prompts.append(prompt)
        return answers.pop(0)

    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    monkeypatch.setattr("getpass.getpass", fake_getpass)

    def answer(*values: str) -> None:
        answers.extend(values)

    yield answer
    assert answers == [], "a prompt was not shown"
    assert len(prompts) in (0, 2)


def test_cli_prompts_twice_on_a_terminal(
    tmp_path: Path, tty: Callable[..., None], capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "passwd"
    tty("wonderland", "wonderland")
    assert auth.main(["add", str(path), "alice"]) == 0
    assert auth.PasswordFileAuth(path).check("alice", "wonderland")
    assert capsys.readouterr().err == f"added alice in {path}\n"


def test_cli_refuses_mismatched_passwords(
    tmp_path: Path, tty: Callable[..., None], capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "passwd"
    tty("wonderland", "wonderlnad")
    assert auth.main(["add", str(path), "alice"]) == 1
    assert capsys.readouterr().err == "error: the passwords do not match\n"
    assert not path.exists()


def test_password_file_auth_repr_names_the_file(password_file: Path) -> None:
    assert repr(auth.PasswordFileAuth(password_file)) == (
        f"PasswordFileAuth({str(password_file)!r})"
    )
