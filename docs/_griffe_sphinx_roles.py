"""A griffe extension for the docs build: Sphinx roles in docstrings become links.

chatkit's docstrings use Sphinx's cross-reference roles (:class:`ChatServer`,
:meth:`aclose`, :class:`~chatkit.hookspecs.ClientSpec`), which Markdown would
show verbatim. This rewrites each role to an *optional* mkdocs-autorefs
reference: a link when the target is rendered on the site, plain code
otherwise (never a warning). A literal block's ``::`` becomes ``:``, and a
module attribute documented by ``#:`` comments above it (Sphinx's other
convention) gets them as its docstring.

Loaded by mkdocs.yml (``extensions:`` of the python handler); not part of the
chatkit package.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import griffe

_ROLE = re.compile(
    r":(?:py:)?(?:class|meth|func|attr|data|mod|exc|obj|const):"
    r"`(?P<tilde>~?)(?P<name>[^`]+)`"
)


def _identifier(obj: griffe.Object, name: str) -> str | None:
    # The first name is looked up where the docstring is, as Python would;
    # "chatkit.X" in the package, whose re-exports point to the real object.
    parts = name.split(".")
    scope = obj
    if parts[0] == obj.package.name and len(parts) > 1:
        scope, parts = obj.package, parts[1:]
    try:
        path = scope.resolve(parts[0])
    except griffe.NameResolutionError:
        return None
    return ".".join([path, *parts[1:]])


def _rewrite(obj: griffe.Object, text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        shown = name.rsplit(".", 1)[-1] if match["tilde"] else name
        identifier = _identifier(obj, name)
        if identifier is None:
            return f"`{shown}`"
        return (
            f'<autoref identifier="{html.escape(identifier)}" optional>'
            f"`{shown}`</autoref>"
        )

    text = _ROLE.sub(replace, text)
    # reST's "text::" introduces a literal block; Markdown needs "text:".
    return re.sub(r"(?<=\S)::$", ":", text, flags=re.M)


def _comment_above(obj: griffe.Object) -> str:
    filepath = obj.filepath
    if obj.lineno is None or not isinstance(filepath, Path):
        return ""
    lines = obj.lines_collection[filepath]
    comment: list[str] = []
    index = obj.lineno - 2  # the line above, 0-based
    while index >= 0 and lines[index].lstrip().startswith("#:"):
        comment.insert(0, lines[index].lstrip()[2:].strip())
        index -= 1
    return "\n".join(comment)


class SphinxRoles(griffe.Extension):
    """Make the Sphinx conventions of a loaded package render in Markdown."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._visit(pkg)

    def _visit(self, obj: griffe.Object) -> None:
        if obj.docstring is None and obj.is_attribute:
            comment = _comment_above(obj)
            if comment:
                obj.docstring = griffe.Docstring(comment, lineno=obj.lineno, parent=obj)
        if obj.docstring is not None:
            obj.docstring.value = _rewrite(obj, obj.docstring.value)
        for member in obj.members.values():
            if not member.is_alias:
                self._visit(member)
