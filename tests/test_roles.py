"""Server operators by login: an authenticator's ``chatkit.Login(operator=
True)`` (a plugin's, ``TokenAuth``'s operator token, a password file's
``operator`` entry) makes the session an operator's. The role is the
session's: it stays across a rename and a resume, and ends with the session,
never passing to the next login under the name (docs/moderation.md).

Everything goes through real servers on 127.0.0.1: ``ChatClient`` for what
an operator may and may not do, raw clients for the resume secret and the
wire's ``error forbidden``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

import chatkit
from chatkit import auth
from tests.conftest import OpenRaw
from tests.helpers import TIMEOUT, RawClient, wait_until
from tests.programs import Launch, child_environment, start_server

TOKEN = "a shared secret for everyone"
OPERATOR_TOKEN = "the operators' own secret"


@asynccontextmanager
async def connect(
    server: chatkit.ChatServer, name: str, token: str | None = None
) -> AsyncIterator[chatkit.ChatClient]:
    async with chatkit.open_client(
        "127.0.0.1", server.port, name=name, token=token, connect_timeout=TIMEOUT
    ) as client:
        yield client


def shared(name: str) -> str:
    """What ``name`` logs in with on a server with a shared token."""
    return TOKEN


def password(name: str) -> str:
    """``name``'s password in the password files here."""
    return f"pw-{name}"


Secret = Callable[[str], str]


async def moderates(
    server: chatkit.ChatServer, op: chatkit.ChatClient, secret: Secret = shared
) -> None:
    """``op`` does what only a server operator may: sets ``lobby``'s modes
    (``lobby`` has no owner), mutes and bans a victim server-wide, bans it
    from a room someone else owns, makes it an operator of that room, lists
    the server's bans, and kicks it off the server."""
    async with (
        connect(server, "owner", secret("owner")) as owner,
        connect(server, "victim", secret("victim")) as victim,
    ):
        await owner.join("dev")  # owner's room, not op's
        await victim.join("dev")
        modes = await op.modes("lobby", slow=0)
        assert modes.room == "lobby"
        assert (await op.mute("victim")).action == "mute"
        assert (await op.unmute("victim")).action == "unmute"
        assert (await op.ban("victim", room="dev")).action == "ban"
        await wait_until(lambda: server.rooms.get("dev") == ("owner",))
        assert (await op.unban("victim", room="dev")).action == "unban"
        assert (await op.op("dev", "victim")).action == "op"
        assert (await op.bans()).room is None
        assert (await op.kick("victim", reason="out")).action == "kick"
        await wait_until(lambda: server.get_user("victim") is None)


async def is_forbidden(
    server: chatkit.ChatServer, client: chatkit.ChatClient, secret: Secret = shared
) -> None:
    """``client`` may do none of what :func:`moderates` does."""
    async with connect(server, "victim", secret("victim")):
        calls = [
            lambda: client.modes("lobby", slow=0),
            lambda: client.mute("victim"),
            lambda: client.ban("victim"),
            lambda: client.ban("victim", room="lobby"),
            lambda: client.op("lobby", "victim"),
            lambda: client.bans(),
            lambda: client.kick("victim"),
        ]
        for call in calls:
            with pytest.raises(chatkit.Forbidden):
                await call()
        assert server.get_user("victim") is not None


# --- the hook: chatkit.Login --------------------------------------------------


class GrantByToken:
    """An authenticator of its own: ``"op"`` logs in as an operator,
    ``"user"`` as anyone; anything else is refused."""

    @chatkit.hookimpl
    def chatkit_authenticate(self, token: str | None) -> chatkit.Login | None:
        if token == "op":
            return chatkit.Login(operator=True)
        if token in ("user", TOKEN):
            return None
        raise chatkit.Veto("who are you?")


async def test_a_plugins_login_with_operator_makes_an_operator() -> None:
    async with (
        chatkit.open_server(plugins=[GrantByToken()]) as server,
        connect(server, "boss", "op") as boss,
        connect(server, "pleb", "user") as pleb,
    ):
        boss_user, pleb_user = server.get_user("boss"), server.get_user("pleb")
        assert boss_user is not None and pleb_user is not None
        assert boss_user.operator is True
        assert pleb_user.operator is False
        await is_forbidden(server, pleb)
        await moderates(server, boss)


async def test_a_login_operator_is_held_back_by_no_room_mode() -> None:
    async with (
        chatkit.open_server(plugins=[GrantByToken()]) as server,
        connect(server, "owner", "user") as owner,
        connect(server, "boss", "op") as boss,
        connect(server, "pleb", "user") as pleb,
    ):
        await owner.join("dev")
        await owner.modes("dev", invite_only=True, moderated=True, slow=60)
        with pytest.raises(chatkit.Forbidden):
            await pleb.join("dev")  # invite-only
        await boss.join("dev")  # not invited: an operator
        await boss.say("first", room="dev")  # moderated: an operator
        await boss.say("second", room="dev")  # slow mode: an operator


def test_login_is_a_frozen_value_with_false_defaults() -> None:
    assert chatkit.Login() == chatkit.Login(identified=False, operator=False)
    login = chatkit.Login(operator=True)
    with pytest.raises(AttributeError):
        login.operator = False  # type: ignore[misc]
    with pytest.raises(TypeError):
        chatkit.Login(True)  # type: ignore[misc]  # keywords only


def test_a_remote_user_reads_as_no_operator() -> None:
    # A plugin may read user.operator of any user it is given, a chatkit_dm
    # recipient on another node of a cluster included.
    assert chatkit.RemoteUser("bob").operator is False


class Broken:
    @chatkit.hookimpl
    def chatkit_authenticate(self) -> None:
        raise RuntimeError("the directory is down")


class SlowGrant:
    @chatkit.hookimpl
    async def chatkit_authenticate(self) -> chatkit.Login:
        await trio.sleep_forever()
        return chatkit.Login(operator=True)  # never


class Refuse:
    @chatkit.hookimpl
    def chatkit_authenticate(self) -> None:
        raise chatkit.Veto("not today")


@pytest.mark.parametrize(
    ("other", "reason"),
    [
        (Broken(), "could not check"),
        (SlowGrant(), "could not check"),
        (Refuse(), "not today"),
    ],
    ids=["raises", "times-out", "vetoes"],
)
async def test_an_operator_grant_does_not_outvote_a_refusal(
    other: object, reason: str
) -> None:
    # Fail closed: an authenticator that breaks refuses, whatever another
    # one granted; so does a Veto.
    async with chatkit.open_server(
        plugins=[GrantByToken(), other], limits=chatkit.Limits(hook_timeout=0.2)
    ) as server:
        with pytest.raises(chatkit.Unauthorized, match=reason):
            async with connect(server, "boss", "op"):
                pass
        assert list(server.users) == []


class Identify:
    """Says that a token of ``"pw-NAME"`` proves the client is NAME."""

    def __init__(self, *, as_login: bool) -> None:
        self.as_login = as_login

    @chatkit.hookimpl
    def chatkit_authenticate(
        self, name: str, token: str | None
    ) -> chatkit.Login | bool | None:
        if token != f"pw-{name}":
            return None
        return chatkit.Login(identified=True) if self.as_login else True


@pytest.mark.parametrize("as_login", [True, False], ids=["Login", "True"])
async def test_identified_takes_over_whether_said_with_login_or_true(
    as_login: bool, open_raw: OpenRaw
) -> None:
    async with chatkit.open_server(plugins=[Identify(as_login=as_login)]) as server:
        old = await open_raw(server.port)
        await old.hello("alice", token="pw-alice")
        new = await open_raw(server.port)
        await new.hello("alice", token="pw-alice")  # no resume secret
        assert any('"replaced"' in line for line in await old.assert_closed())
        user = server.get_user("alice")
        assert user is not None and not user.operator  # identified is no role


class Odd:
    @chatkit.hookimpl
    def chatkit_authenticate(self) -> object:
        return "operator"  # not a Login: ignored, and said so


async def test_an_odd_return_is_ignored_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "chatkit.server")
    async with (
        chatkit.open_server(plugins=[Odd()]) as server,
        connect(server, "alice") as alice,
    ):
        user = server.get_user("alice")
        assert user is not None and not user.operator
        with pytest.raises(chatkit.Forbidden):
            await alice.kick("alice")
    assert any(
        "chatkit_authenticate returned 'operator'" in r.getMessage()
        for r in caplog.records
    )


# --- TokenAuth's operator token -------------------------------------------------


@pytest.fixture
async def server() -> AsyncIterator[chatkit.ChatServer]:
    """A server letting in ``TOKEN``, and operators with ``OPERATOR_TOKEN``."""
    plugin = auth.TokenAuth(TOKEN, operator_token=OPERATOR_TOKEN)
    async with chatkit.open_server(plugins=[plugin]) as server:
        yield server


async def test_the_operator_token_makes_an_operator_and_the_shared_one_does_not(
    server: chatkit.ChatServer,
) -> None:
    async with (
        connect(server, "root", OPERATOR_TOKEN) as root,
        connect(server, "alice", TOKEN) as alice,
    ):
        root_user, alice_user = server.get_user("root"), server.get_user("alice")
        assert root_user is not None and root_user.operator
        assert alice_user is not None and not alice_user.operator
        await is_forbidden(server, alice)
        await moderates(server, root)


async def forbidden_on_the_wire(client: RawClient, ref: int) -> None:
    """``client``'s server kick is answered ``error forbidden``."""
    await client.send_json(type="kick", name="nobody", ref=ref)
    error = await client.expect("error", ref=ref)
    assert error["code"] == "forbidden", error


async def allowed_on_the_wire(client: RawClient, ref: int) -> None:
    """``client`` sets lobby's modes (server operators only)."""
    await client.send_json(type="mode", room="lobby", slow=0, ref=ref)
    await client.expect("modes", room="lobby", ref=ref)


async def test_the_role_stays_with_the_session_across_a_rename(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    root = await open_raw(server.port)
    await root.hello("root", token=OPERATOR_TOKEN)
    await root.send_json(type="nick", name="boss", ref=1)
    await root.expect("renamed", new="boss", ref=1)
    await allowed_on_the_wire(root, 2)  # boss is still an operator
    # The old name is free, and carries nothing: a plain login takes it.
    imposter = await open_raw(server.port)
    await imposter.hello("root", token=TOKEN)
    await forbidden_on_the_wire(imposter, 3)
    user = server.get_user("root")
    assert user is not None and not user.operator


async def test_the_role_ends_with_the_session(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    first = await open_raw(server.port)
    await first.hello("root", token=OPERATOR_TOKEN)
    await allowed_on_the_wire(first, 1)
    await first.send_json(type="bye")
    await first.assert_closed()
    await wait_until(lambda: server.get_user("root") is None)
    # The next person to log in as root, with the shared token, is no one
    # special.
    second = await open_raw(server.port)
    await second.hello("root", token=TOKEN)
    await forbidden_on_the_wire(second, 2)
    user = server.get_user("root")
    assert user is not None and not user.operator


async def test_a_resume_keeps_the_role(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    old = await open_raw(server.port)
    secret = (await old.hello("root", token=OPERATOR_TOKEN))["resume"]
    # The reconnect presents the shared token only: the session it takes
    # over is what makes it an operator.
    new = await open_raw(server.port)
    await new.hello("root", token=TOKEN, resume=secret)
    assert any('"replaced"' in line for line in await old.assert_closed())
    await allowed_on_the_wire(new, 1)
    user = server.get_user("root")
    assert user is not None and user.operator


async def test_a_resume_grants_no_role_the_session_did_not_have(
    server: chatkit.ChatServer, open_raw: OpenRaw
) -> None:
    old = await open_raw(server.port)
    secret = (await old.hello("alice", token=TOKEN))["resume"]
    new = await open_raw(server.port)
    await new.hello("alice", token=TOKEN, resume=secret)
    await old.assert_closed()
    await forbidden_on_the_wire(new, 1)


async def test_the_server_cli_takes_an_operator_token(launch: Launch) -> None:
    _, port = await start_server(
        launch, "--no-db", "--auth-token", TOKEN, "--operator-token", OPERATOR_TOKEN
    )
    async with (
        chatkit.open_client(
            "127.0.0.1", port, name="root", token=OPERATOR_TOKEN
        ) as root,
        chatkit.open_client("127.0.0.1", port, name="bob", token=TOKEN) as bob,
    ):
        with pytest.raises(chatkit.Forbidden):
            await bob.kick("root")
        ack = await root.kick("bob", reason="bye bob")
        assert (ack.action, ack.by, ack.name) == ("kick", "root", "bob")


# --- PasswordFileAuth's operator entries ------------------------------------------


def password_file(path: Path, *names: str, operators: tuple[str, ...] = ()) -> Path:
    """A password file for ``names`` (each with :func:`password`), those in
    ``operators`` with the role; cheap hashes (n=2) keep the tests fast."""
    for name in names:
        auth.add_user(path, name, password(name), operator=name in operators, n=2)
    return path


async def test_a_password_files_operator_entry_moderates_and_a_plain_one_may_not(
    tmp_path: Path, open_raw: OpenRaw
) -> None:
    path = password_file(
        tmp_path / "passwd", "root", "alice", "owner", "victim", operators=("root",)
    )
    async with (
        chatkit.open_server(plugins=[auth.PasswordFileAuth(path)]) as server,
        connect(server, "root", password("root")) as root,
        connect(server, "alice", password("alice")) as alice,
    ):
        await is_forbidden(server, alice, password)
        raw = await open_raw(server.port)  # the wire's answer, as documented
        await raw.hello("owner", token=password("owner"))
        await forbidden_on_the_wire(raw, 1)
        await raw.send_json(type="bye")
        await raw.assert_closed()
        await wait_until(lambda: server.get_user("owner") is None)
        await moderates(server, root, password)


async def test_a_password_role_is_the_sessions_and_reload_changes_the_next_login(
    tmp_path: Path, open_raw: OpenRaw
) -> None:
    path = password_file(tmp_path / "passwd", "root", "alice", operators=("root",))
    plugin = auth.PasswordFileAuth(path)
    async with chatkit.open_server(plugins=[plugin]) as server:
        root = await open_raw(server.port)
        await root.hello("root", token=password("root"))
        alice = await open_raw(server.port)
        await alice.hello("alice", token=password("alice"))
        await allowed_on_the_wire(root, 1)
        await forbidden_on_the_wire(alice, 2)
        # The roles trade places in the file; the sessions keep theirs.
        auth.set_operator(path, "root", False)
        auth.set_operator(path, "alice", True)
        plugin.reload()
        await allowed_on_the_wire(root, 3)
        await forbidden_on_the_wire(alice, 4)
        # Logging in again (the password takes the session over, no resume
        # secret) is a new login: it has the role the file gives now.
        new_root = await open_raw(server.port)
        await new_root.hello("root", token=password("root"))
        await root.assert_closed()
        await forbidden_on_the_wire(new_root, 5)
        new_alice = await open_raw(server.port)
        await new_alice.hello("alice", token=password("alice"))
        await alice.assert_closed()
        await allowed_on_the_wire(new_alice, 6)


async def test_cli_add_operator_makes_an_operator_end_to_end(
    tmp_path: Path, launch: Launch
) -> None:
    path = tmp_path / "passwd"
    for extra, name in ((["--operator"], "root"), ([], "bob")):
        added = await trio.run_process(
            [sys.executable, "-m", "chatkit.auth", "add", *extra, str(path), name],
            stdin=f"{password(name)}\n".encode(),
            capture_stdout=True,
            capture_stderr=True,
            env=child_environment(),
        )
        assert added.stderr.decode().startswith(f"added {name} in {path}")
    _, port = await start_server(launch, "--no-db", "--password-file", str(path))
    async with (
        chatkit.open_client("127.0.0.1", port, name="root", token="pw-root") as root,
        chatkit.open_client("127.0.0.1", port, name="bob", token="pw-bob") as bob,
    ):
        with pytest.raises(chatkit.Forbidden):
            await bob.mute("root")
        ack = await root.mute("bob", reason="quiet")
        assert (ack.action, ack.by, ack.name) == ("mute", "root", "bob")
        with pytest.raises(chatkit.Muted):
            await bob.say("hello?")
