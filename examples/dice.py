"""A server plugin that adds a command: ``/roll 2d6`` rolls two six-sided dice.

A client sends ``{"type": "command", "name": "roll", "args": "2d6"}`` and
gets back, privately, ``alice rolled 2d6: 3 + 5 = 8``. ``roll`` alone is
``1d6``; ``d20`` is ``1d20``; ``3d6+2`` adds 2. Bad input gets a kind answer
that says what is expected, never an error; dice counts and sides are
bounded (at most 20 dice of at most 1000 sides), so nobody can make the
server roll a million dice. Other commands are left to other plugins.

Run a server with it, from the repository root (so that ``examples`` is
importable)::

    python -m chatkit.server --plugin examples.dice:Dice

In a program: ``chatkit.ChatServer(plugins=[Dice()])``; tests pass their own
``random.Random(seed)``.
"""

from __future__ import annotations

import random
import re
from typing import Final

import chatkit

#: The most dice one roll may throw, and the most sides a die may have.
MAX_DICE: Final = 20
MAX_SIDES: Final = 1000

_ROLL: Final = re.compile(r"(\d*)d(\d+)([+-]\d+)?")
USAGE: Final = (
    f"try /roll 2d6 (up to {MAX_DICE} dice of 2 to {MAX_SIDES} sides, "
    "and a modifier like 2d6+1)"
)


class Dice:
    """Answers ``/roll NdS[+M]`` (hook ``chatkit_command``).

    Args:
        rng: where the numbers come from (a seeded ``random.Random`` makes
            rolls repeatable); by default the ``random`` module's own.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng if rng is not None else random.Random()

    def roll(self, who: str, args: str) -> str:
        """The answer to ``/roll args`` from ``who``."""
        spec = args.strip().lower().replace(" ", "") or "1d6"
        match = _ROLL.fullmatch(spec)
        if match is None:
            return f"{who}, I can't read {args.strip()!r}: {USAGE}"
        count = int(match[1] or "1")
        sides = int(match[2])
        modifier = int(match[3] or "0")
        if not 1 <= count <= MAX_DICE or not 2 <= sides <= MAX_SIDES:
            return f"{who}, that is too many dice or sides: {USAGE}"
        rolls = [self.rng.randint(1, sides) for _ in range(count)]
        total = sum(rolls) + modifier
        parts = " + ".join(map(str, rolls))
        if modifier:
            parts += f" {'+' if modifier > 0 else '-'} {abs(modifier)}"
        shown = f"{count}d{sides}{match[3] or ''}"
        if count == 1 and not modifier:
            return f"{who} rolled {shown}: {total}"
        return f"{who} rolled {shown}: {parts} = {total}"

    @chatkit.hookimpl
    def chatkit_command(self, user: chatkit.User, name: str, args: str) -> str | None:
        """Answer ``/roll``; ``None`` for every other command."""
        if name.lower() != "roll":
            return None
        return self.roll(user.name, args)
