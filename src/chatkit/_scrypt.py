"""Password hashing for :mod:`chatkit.auth`: scrypt, with its parameters,
salt and derived key in one ``scrypt$n$r$p$salt$hash`` string.

Re-exported by :mod:`chatkit.auth` (its public home); kept apart from the
plugins and the password file, which use it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import unicodedata
from dataclasses import dataclass
from typing import Final

__all__ = [
    "HASH_BYTES",
    "SALT_BYTES",
    "SCRYPT_N",
    "SCRYPT_P",
    "SCRYPT_R",
    "Hash",
    "hash_password",
    "parse_hash",
    "verify_password",
]

#: scrypt CPU/memory cost (``N``) of new hashes: 2048 (2 to the 11th),
#: about 2 MiB and 3 ms per verification. Deliberately far below the usual
#: interactive-login advice (2 to the 17th): verification runs inside the
#: server's event loop, which it blocks while it runs. See
#: ``docs/security.md``.
SCRYPT_N: Final = 2**11
#: scrypt block size (``r``) of new hashes.
SCRYPT_R: Final = 8
#: scrypt parallelism (``p``) of new hashes.
SCRYPT_P: Final = 1
#: Length of the random salt of new hashes, in bytes.
SALT_BYTES: Final = 16
#: Length of the derived key of new hashes, in bytes.
HASH_BYTES: Final = 32

_SCHEME: Final = "scrypt"
# Limits on parameters read from a hash string, so that a hand-edited or
# hostile file cannot make one login take seconds or gigabytes. Memory is
# about 128 * r * (n + p) bytes.
_MAX_MEMORY: Final = 64 * 1024 * 1024
_MAX_P: Final = 16
_MIN_SALT_BYTES: Final = 8
_MIN_HASH_BYTES: Final = 16


@dataclass(frozen=True, slots=True)
class Hash:
    """A parsed ``scrypt$n$r$p$salt$hash`` string."""

    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    def derive(self, password: str) -> bytes:
        return _scrypt(password, self.salt, self.n, self.r, self.p, len(self.digest))

    def encode(self) -> str:
        salt = base64.b64encode(self.salt).decode("ascii")
        digest = base64.b64encode(self.digest).decode("ascii")
        return f"{_SCHEME}${self.n}${self.r}${self.p}${salt}${digest}"


def _memory(n: int, r: int, p: int) -> int:
    return 128 * r * (n + p + 2)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    # NFC, so that the same password typed on two systems that compose
    # accents differently hashes the same (as RFC 8265's OpaqueString).
    secret = unicodedata.normalize("NFC", password).encode("utf-8")
    return hashlib.scrypt(
        secret,
        salt=salt,
        n=n,
        r=r,
        p=p,
        dklen=dklen,
        maxmem=_memory(n, r, p) + 1024 * 1024,
    )


def _check_parameters(n: int, r: int, p: int) -> None:
    if n < 2 or n & (n - 1):
        raise ValueError(f"scrypt n must be a power of 2 above 1, not {n}")
    if r < 1 or not 1 <= p <= _MAX_P:
        raise ValueError(f"scrypt r must be >= 1 and p 1..{_MAX_P}, not r={r} p={p}")
    if _memory(n, r, p) > _MAX_MEMORY:
        raise ValueError(
            f"scrypt n={n} r={r} p={p} needs more than"
            f" {_MAX_MEMORY // (1024 * 1024)} MiB"
        )


def parse_hash(encoded: str) -> Hash:
    """Parse a hash string; ValueError says what is wrong with it."""
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != _SCHEME:
        raise ValueError("hash is not of the form scrypt$n$r$p$salt$hash")
    try:
        n, r, p = (int(part, 10) for part in parts[1:4])
    except ValueError:
        raise ValueError("scrypt n, r and p must be decimal integers") from None
    _check_parameters(n, r, p)
    try:
        salt = base64.b64decode(parts[4], validate=True)
        digest = base64.b64decode(parts[5], validate=True)
    except binascii.Error:
        raise ValueError("salt and hash must be base64") from None
    if len(salt) < _MIN_SALT_BYTES or len(digest) < _MIN_HASH_BYTES:
        raise ValueError(
            f"salt must be at least {_MIN_SALT_BYTES} bytes and hash at least"
            f" {_MIN_HASH_BYTES} bytes"
        )
    return Hash(n, r, p, salt, digest)


def hash_password(
    password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P
) -> str:
    """Hash ``password`` for a password file, with a fresh random salt.

    Args:
        password: the password (NFC-normalised, then UTF-8 encoded).
        n: scrypt CPU/memory cost, a power of 2; :data:`SCRYPT_N` by default.
            Each verification of the hash costs time proportional to ``n * r``
            inside the server's event loop.
        r: scrypt block size; :data:`SCRYPT_R` by default.
        p: scrypt parallelism; :data:`SCRYPT_P` by default.

    Returns:
        ``scrypt$n$r$p$salt$hash``, salt and hash in base64; the parameters
        travel with the hash, so hashes made with other ones still verify.

    Raises:
        ValueError: ``password`` is empty, or the parameters are invalid or
            need more than 64 MiB.
    """
    if not password:
        raise ValueError("the password is empty")
    _check_parameters(n, r, p)
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(password, salt, n, r, p, HASH_BYTES)
    return Hash(n, r, p, salt, digest).encode()


def verify_password(password: str, encoded: str) -> bool:
    """True if ``password`` matches ``encoded``, a :func:`hash_password` string.

    The derived key is compared with :func:`hmac.compare_digest`, in
    constant time.

    Raises:
        ValueError: ``encoded`` is not a valid hash string.
    """
    parsed = parse_hash(encoded)
    return hmac.compare_digest(parsed.derive(password), parsed.digest)
