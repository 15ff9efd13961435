"""Argument types of the command-line programs: numbers checked as argparse
usage errors (``error: argument --port: must be from 0 to 65535 ...``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["at_least", "integer", "not_negative", "port", "positive"]


def integer(text: str) -> int:
    """An integer flag's value."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, not {text!r}") from None


def port(lowest: int) -> Callable[[str], int]:
    """The type of a ``--port``: ``lowest`` (0: a free one) to 65535."""
    note = " (0: a free one)" if lowest == 0 else ""

    def check(text: str) -> int:
        value = integer(text)
        if not lowest <= value <= 65535:
            raise argparse.ArgumentTypeError(
                f"must be from {lowest} to 65535{note}, not {value}"
            )
        return value

    return check


def at_least(least: int) -> Callable[[str], int]:
    """The type of an integer flag that must be ``least`` or more."""

    def check(text: str) -> int:
        value = integer(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, not {value}")
        return value

    return check


def not_negative(text: str) -> float:
    """A number of seconds (or a rate) where 0 means "off"."""
    return _number(text, lambda value: value >= 0, "0 or more")


def positive(text: str) -> float:
    """A number that must be more than 0."""
    return _number(text, lambda value: value > 0, "positive")


def _number(text: str, ok: Callable[[float], bool], wanted: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, not {text!r}") from None
    if not ok(value):  # nan fails every comparison: refused too
        raise argparse.ArgumentTypeError(f"must be {wanted}, not {text}")
    return value
