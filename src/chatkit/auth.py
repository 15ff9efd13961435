"""Built-in authentication: a shared token or a password file.

Two plugins for the :meth:`~chatkit.hookspecs.ServerSpec.chatkit_authenticate`
hook. Give one to a server and a client must present a valid ``token`` in its
``hello`` to get in::

    import chatkit
    from chatkit.auth import PasswordFileAuth, TokenAuth

    server = chatkit.ChatServer(plugins=[TokenAuth("correct horse battery")])
    server = chatkit.ChatServer(plugins=[PasswordFileAuth("/etc/chatkit/passwd")])

A refused client gets ``error unauthorized`` and is disconnected; it never
joins a room, so it sees no message, member list or history. Line-mode
clients (``nc``) cannot send a token and are always refused while either
plugin is on.

Passwords are stored as scrypt hashes; create entries with
``python -m chatkit.auth add FILE NAME`` or :func:`hash_password`. See
``docs/security.md`` for the cost parameters and their trade-off.

Either plugin can also make a login a server operator's: ``TokenAuth``'s
``operator_token``, or a password file entry with the ``operator`` role
(``python -m chatkit.auth add --operator FILE NAME``); see
``docs/moderation.md``.
"""

from __future__ import annotations

import argparse
import getpass
import hmac
import os
import secrets
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Final

from ._exceptions import Veto
from ._hooks import hookimpl
from ._scrypt import HASH_BYTES as HASH_BYTES
from ._scrypt import SALT_BYTES as SALT_BYTES
from ._scrypt import SCRYPT_N as SCRYPT_N
from ._scrypt import SCRYPT_P as SCRYPT_P
from ._scrypt import SCRYPT_R as SCRYPT_R
from ._scrypt import Hash, parse_hash
from ._scrypt import hash_password as hash_password
from ._scrypt import verify_password as verify_password
from .protocol import is_valid_name
from .server import Login

if TYPE_CHECKING:
    from .server import User

__all__ = [
    "HASH_BYTES",
    "INVALID_LOGIN",
    "INVALID_TOKEN",
    "SALT_BYTES",
    "SCRYPT_N",
    "SCRYPT_P",
    "SCRYPT_R",
    "PasswordFileAuth",
    "TokenAuth",
    "add_user",
    "hash_password",
    "main",
    "set_operator",
    "verify_password",
]

#: The refusal reason of :class:`TokenAuth`.
INVALID_TOKEN: Final = "invalid token"
#: The refusal reason of :class:`PasswordFileAuth`, the same whether the name
#: is unknown or the password wrong, so that it reveals no user names.
INVALID_LOGIN: Final = "invalid name or password"

# The role a password file's entry may give, as its third field.
_OPERATOR: Final = "operator"


# --- plugins -----------------------------------------------------------------


class TokenAuth:
    """A plugin admitting only clients whose ``hello`` carries ``token``
    (or ``operator_token``).

    One secret shared by every user: it says who may connect, not who they
    are (any holder may pick any free name). Refused clients get ``error
    unauthorized`` with the reason :data:`INVALID_TOKEN`. A ``hello`` without
    a token, and every line-mode login, is refused.

    A client presenting ``operator_token`` instead gets in as a server
    operator (:class:`~chatkit.Login` with ``operator=True``): the role is
    its session's, under whatever name it picks, and ends with it (see
    docs/moderation.md).

    Args:
        token: the shared secret; not empty. Send it over TLS: ``hello``
            carries it in clear text.
        operator_token: the server operators' secret, if any; not empty,
            and not ``token``.

    Raises:
        ValueError: a token is empty, or both are the same.
    """

    def __init__(self, token: str, *, operator_token: str | None = None) -> None:
        if not token:
            raise ValueError("the shared token is empty")
        if operator_token is not None:
            if not operator_token:
                raise ValueError("the operator token is empty")
            if operator_token == token:
                raise ValueError("the operator token is the shared token")
        self._token = token.encode("utf-8")
        self._operator_token = (
            None if operator_token is None else operator_token.encode("utf-8")
        )

    def __repr__(self) -> str:
        operator = ", operator_token=<secret>" if self._operator_token else ""
        return f"{type(self).__name__}(<secret>{operator})"

    @hookimpl(tryfirst=True)
    def chatkit_authenticate(self, token: str | None) -> Login | None:
        """Refuse with :data:`INVALID_TOKEN` unless ``token`` is the secret
        (None: let in) or the operators' secret (let in as an operator)."""
        if token is None:
            raise Veto(INVALID_TOKEN)
        # Compared as bytes: compare_digest's time depends on the lengths of
        # the inputs (worthless to learn for a long random token), never on
        # where they differ. Both comparisons always run, so that the time
        # does not tell which secret matched, either.
        offered = token.encode("utf-8")
        plain = hmac.compare_digest(offered, self._token)
        operator = self._operator_token is not None and hmac.compare_digest(
            offered, self._operator_token
        )
        if operator:
            return Login(operator=True)
        if not plain:
            raise Veto(INVALID_TOKEN)
        return None


class PasswordFileAuth:
    """A plugin admitting users whose ``hello`` token is their password.

    The password file has one ``name:hash`` line per user, ``hash`` made by
    :func:`hash_password` (or ``python -m chatkit.auth add FILE NAME``), or
    ``name:hash:operator`` for a server operator (each of its logins is
    one: :class:`~chatkit.Login` with ``operator=True``); blank lines and
    lines starting with ``#`` are ignored. Names are matched
    case-insensitively, as chat names are. The client logs in with its name
    and sends its password as ``token``. An unknown name and a wrong password
    get the same refusal, :data:`INVALID_LOGIN`, after the same amount of
    work (an unknown name is checked against a dummy hash), so neither the
    answer nor its timing tells which names exist.

    The file is read once, here; :meth:`reload` reads it again (a role
    changed there counts from the next login on; a session keeps the role it
    logged in with). Each check
    runs scrypt in the connecting user's task, blocking the event loop for a
    few milliseconds with the default parameters.

    A logged-in user cannot rename (``nick``) to a name registered to
    someone else: the ``nick`` gets ``error rejected``. A login with the
    right password while a session of that name is still logged in (a
    reconnect before the server noticed that the old connection was gone)
    takes that session over: the old connection gets ``error replaced``
    and is closed.

    Args:
        path: the password file.

    Attributes:
        path: the password file, as a :class:`~pathlib.Path`.

    Raises:
        OSError: the file cannot be read.
        ValueError: the file is malformed; the message names the file and
            the line.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._entries: Mapping[str, _Entry] = _read_password_file(self.path)
        # Checked when the name is unknown, so that an unknown name costs
        # the same scrypt run as a known one.
        self._dummy = parse_hash(hash_password(secrets.token_urlsafe(16)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    @property
    def names(self) -> frozenset[str]:
        """The registered names, casefolded."""
        return frozenset(self._entries)

    @property
    def operators(self) -> frozenset[str]:
        """The names whose logins are server operators', casefolded."""
        return frozenset(key for key, entry in self._entries.items() if entry.operator)

    def reload(self) -> None:
        """Read the password file again; on error, keep the current users.

        Raises:
            OSError: the file cannot be read.
            ValueError: the file is malformed (file and line named).
        """
        self._entries = _read_password_file(self.path)

    def check(self, name: str, password: str | None) -> bool:
        """True if ``password`` is ``name``'s password. Always runs scrypt."""
        return self._verified(name, password) is not None

    def _verified(self, name: str, password: str | None) -> _Entry | None:
        """``name``'s entry if ``password`` is its password."""
        entry = self._entries.get(name.casefold())
        expected = entry.hash if entry is not None else self._dummy
        derived = expected.derive(password or "")
        match = hmac.compare_digest(derived, expected.digest)
        return entry if match and password is not None else None

    @hookimpl(tryfirst=True)
    def chatkit_authenticate(self, name: str, token: str | None) -> Login:
        """Refuse with :data:`INVALID_LOGIN` unless ``token`` is ``name``'s
        password; it is: the client is ``name`` (it may take over a session
        of ``name`` still logged in), a server operator if its entry says
        so."""
        entry = self._verified(name, token)
        if entry is None:
            raise Veto(INVALID_LOGIN)
        return Login(identified=True, operator=entry.operator)

    @hookimpl(tryfirst=True)
    def chatkit_nick(self, user: User, new: str) -> None:
        """Refuse a rename to a name registered to someone else: a name in
        the file is an identity, taken only by logging in with its
        password."""
        if new.casefold() != user.name.casefold() and new.casefold() in self._entries:
            raise Veto(f"{new} is a registered name")


# --- the password file -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Entry:
    """A password file's line: ``name:hash`` or ``name:hash:operator``."""

    name: str  # as written
    hash: Hash
    operator: bool


def _line(name: str, encoded: str, operator: bool) -> str:
    return f"{name}:{encoded}:{_OPERATOR}" if operator else f"{name}:{encoded}"


def _read_password_file(path: Path) -> Mapping[str, _Entry]:
    """The entries of a password file, by casefolded name (read-only).

    Raises:
        OSError: the file cannot be read.
        ValueError: a malformed line, as ``FILE:LINE: what is wrong``.
    """
    return _parse_password_file(_read_text(path), path)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason})") from None


def _is_entry(line: str) -> bool:
    return bool(line) and not line.startswith("#")


def _parse_password_file(text: str, path: Path) -> Mapping[str, _Entry]:
    entries: dict[str, _Entry] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not _is_entry(line):
            continue
        try:
            # Neither names nor hashes (base64 and "$") hold a colon.
            fields = line.split(":")
            if len(fields) not in (2, 3):
                raise ValueError("expected name:hash or name:hash:ROLE")
            name, encoded, *role = fields
            if not is_valid_name(name):
                raise ValueError(f"{name!r} is not a valid chat name")
            if name.casefold() in entries:
                raise ValueError(f"{name} appears twice (names ignore case)")
            if role and role != [_OPERATOR]:
                raise ValueError(
                    f"unknown role {role[0]!r} (the one role is {_OPERATOR!r})"
                )
            entries[name.casefold()] = _Entry(name, parse_hash(encoded), bool(role))
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: {exc}") from None
    return MappingProxyType(entries)


def add_user(
    path: str | os.PathLike[str],
    name: str,
    password: str,
    *,
    operator: bool | None = None,
    n: int = SCRYPT_N,
    r: int = SCRYPT_R,
    p: int = SCRYPT_P,
) -> bool:
    """Set ``name``'s password in the file at ``path``, creating it if needed.

    The file is rewritten atomically (a temporary file in the same directory,
    then :func:`os.replace`) with mode 0600; other lines and comments are
    kept. An existing entry for ``name`` (in any case) is replaced in place.

    Args:
        operator: give ``name`` the server-operator role (True) or take it
            away (False); None keeps what its entry had (a new one: none).

    Returns:
        True if ``name`` was already in the file.

    Raises:
        ValueError: ``name`` is not a valid chat name, ``password`` is empty,
            or the existing file is malformed (it is left untouched).
        OSError: the file cannot be read or written.
    """
    if not is_valid_name(name):
        raise ValueError(f"{name!r} is not a valid chat name")
    target = Path(path)
    text, entries = _read_for_update(target)
    if operator is None:
        old = entries.get(name.casefold())
        operator = old is not None and old.operator
    encoded = hash_password(password, n=n, r=r, p=p)
    return _put(target, text, name, _line(name, encoded, operator))


def set_operator(path: str | os.PathLike[str], name: str, operator: bool) -> bool:
    """Give ``name`` the server-operator role in the password file at
    ``path`` (``operator``), or take it away; its password is unchanged.
    The file is rewritten as :func:`add_user` does.

    Returns:
        False if the entry was so already (the file is left as it was).

    Raises:
        ValueError: ``name`` is not in the file, or the file is malformed.
        OSError: the file cannot be read or written.
    """
    target = Path(path)
    text, entries = _read_for_update(target)
    entry = entries.get(name.casefold())
    if entry is None:
        raise ValueError(f"{name} is not in {target}")
    if entry.operator == operator:
        return False
    _put(target, text, name, _line(entry.name, entry.hash.encode(), operator))
    return True


def _read_for_update(target: Path) -> tuple[str, Mapping[str, _Entry]]:
    """The file's text (empty if missing) and its entries: never rewrite a
    file we cannot read."""
    try:
        text = _read_text(target)
    except FileNotFoundError:
        text = ""
    return text, _parse_password_file(text, target)


def _put(target: Path, text: str, name: str, entry: str) -> bool:
    """Write ``text`` to ``target`` with ``name``'s line (in any case) made
    ``entry``, added at the end if it had none; True if it had one."""
    lines = text.splitlines()
    replaced = False
    for index, raw in enumerate(lines):
        line = raw.strip()
        if _is_entry(line) and line.partition(":")[0].casefold() == name.casefold():
            lines[index] = entry
            replaced = True
    if not replaced:
        lines.append(entry)
    _write_atomically(target, "".join(line + "\n" for line in lines))
    return replaced


def _write_atomically(target: Path, text: str) -> None:
    # mkstemp creates the file with mode 0600, so the hashes are never
    # readable by others, not even for a moment.
    fd, temporary = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=".tmp", dir=target.parent
    )
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        os.unlink(temporary)
        raise


# --- command line --------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m chatkit.auth",
        description="Manage chatkit password files.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser(
        "add",
        help="add a user or change its password",
        description="Set NAME's password in FILE (created if missing, mode "
        "0600). The password is prompted for on a terminal, or read as one "
        "line from standard input otherwise.",
    )
    add.add_argument("file", metavar="FILE", help="the password file")
    add.add_argument("name", metavar="NAME", help="the chat name")
    add.add_argument(
        "--scrypt-n",
        type=int,
        default=SCRYPT_N,
        metavar="N",
        help="scrypt cost, a power of 2 (default: %(default)s); each login "
        "costs the server time proportional to it",
    )
    add.add_argument(
        "--operator",
        action=argparse.BooleanOptionalAction,
        help="NAME's logins are server operators' (--no-operator: no longer); "
        "without either, an existing entry keeps its role",
    )
    for command, text in (
        ("op", "give NAME the server-operator role"),
        ("deop", "take the server-operator role from NAME"),
    ):
        role = commands.add_parser(
            command,
            help=text,
            description=f"{text[0].upper()}{text[1:]} in FILE, from NAME's next "
            "login on (the password is unchanged).",
        )
        role.add_argument("file", metavar="FILE", help="the password file")
        role.add_argument("name", metavar="NAME", help="a chat name in FILE")
    return parser


def _read_password() -> str:
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if password != getpass.getpass("Repeat password: "):
            raise ValueError("the passwords do not match")
        return password
    line = sys.stdin.readline()
    return line.removesuffix("\n").removesuffix("\r")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m chatkit.auth``; returns the exit status.

    ``add FILE NAME`` sets NAME's password in FILE (see :func:`add_user`),
    prompting for it (twice) on a terminal, or reading one line from
    standard input otherwise; ``--operator`` (``--no-operator``) gives
    (takes away) the server-operator role. ``op FILE NAME`` and ``deop FILE
    NAME`` give and take away the role alone (:func:`set_operator`).
    Errors are reported on standard error with status 1; usage errors exit
    with status 2.
    """
    args = _build_parser().parse_args(argv)
    name, path = args.name, args.file
    try:
        if not is_valid_name(name):
            raise ValueError(f"{name!r} is not a valid chat name")
        if args.command == "add":
            password = _read_password()
            replaced = add_user(
                path, name, password, operator=args.operator, n=args.scrypt_n
            )
            done = f"{'updated' if replaced else 'added'} {name} in {path}"
            if args.operator is not None:
                done += f" ({'' if args.operator else 'not '}a server operator)"
        else:
            on = args.command == "op"
            changed = set_operator(path, name, on)
            done = {
                (True, True): f"{name} is now a server operator in {path}",
                (True, False): f"{name} was a server operator already in {path}",
                (False, True): f"{name} is no longer a server operator in {path}",
                (False, False): f"{name} was not a server operator in {path}",
            }[on, changed]
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(done, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
