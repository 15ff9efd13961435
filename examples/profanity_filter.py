"""A server plugin that rewrites messages: it masks words from a small list.

``darn it`` becomes ``d**n it`` for everyone in the room (and in the room's
history); private messages are filtered too. Only whole words are masked,
whatever their case, so ``Darn`` is caught and ``darnell`` is not.

Run a server with it, from the repository root (so that ``examples`` is
importable)::

    python -m chatkit.server --plugin examples.profanity_filter:ProfanityFilter

The CLI makes a ``ProfanityFilter()`` with the default word list. In your own
program, pass your words::

    server = chatkit.ChatServer(plugins=[ProfanityFilter({"frak", "smeg"})])
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

import chatkit

#: The words masked by default (mild ones: this is an example).
DEFAULT_WORDS: Final = frozenset({"darn", "heck", "frak", "smeg", "gosh"})


def mask(word: str) -> str:
    """``darn`` -> ``d**n``: the first and last letters stay, so the text
    stays readable; words of one or two letters become all stars."""
    if len(word) <= 2:
        return "*" * len(word)
    return word[0] + "*" * (len(word) - 2) + word[-1]


class ProfanityFilter:
    """Masks ``words`` in room and private messages (hooks ``chatkit_message``
    and ``chatkit_dm``: a rewrite, never a veto).

    Args:
        words: the words to mask, matched whole and case-insensitively.
    """

    def __init__(self, words: Iterable[str] = DEFAULT_WORDS) -> None:
        self.words = frozenset(word.casefold() for word in words if word)
        # Longest first, so that a word wins over a shorter word it contains.
        alternatives = sorted(self.words, key=len, reverse=True)
        self._pattern = (
            re.compile(
                r"\b(?:" + "|".join(map(re.escape, alternatives)) + r")\b",
                re.IGNORECASE,
            )
            if alternatives
            else None
        )

    def clean(self, text: str) -> str:
        """``text`` with every listed word masked."""
        if self._pattern is None:
            return text
        return self._pattern.sub(lambda match: mask(match.group()), text)

    @chatkit.hookimpl
    def chatkit_message(self, text: str) -> str | None:
        """Rewrite a room message; ``None`` (unchanged) when it is clean."""
        cleaned = self.clean(text)
        return cleaned if cleaned != text else None

    @chatkit.hookimpl
    def chatkit_dm(self, text: str) -> str | None:
        """Rewrite a private message the same way."""
        cleaned = self.clean(text)
        return cleaned if cleaned != text else None
