"""The ``fires`` marker: a hook counts as tested only where a test fires it.

A test in tests/test_hooks.py says which hooks it fires::

    @pytest.mark.fires("chatkit_message", "chatkit_message_delivered")
    async def test_x(hooks: HookRecorder) -> None:
        async with chatkit.open_server(plugins=[..., hooks.server]) as server:
            ...

``hooks`` is a :class:`chatkit.testing.HookRecorder`: the test gives
``hooks.server`` to the servers and ``hooks.client`` to the clients it
builds, and after it passes, it fails unless every hook its marker names
was called on one of them (a marked test that does not ask for ``hooks``
fails too).

Loaded as a plugin by tests/conftest.py (the marker is registered in
pyproject.toml).
"""

from __future__ import annotations

from collections.abc import Generator

import pytest

from chatkit import hookspecs
from chatkit.testing import HookRecorder


def hook_names() -> list[str]:
    """Every server and client hook, sorted."""
    return sorted(
        name
        for spec in (hookspecs.ServerSpec, hookspecs.ClientSpec)
        for name, value in vars(spec).items()
        if hasattr(value, f"{hookspecs.PROJECT_NAME}_spec")
    )


@pytest.fixture
def hooks() -> HookRecorder:
    """Records the hooks fired on what the test gives ``hooks.server`` or
    ``hooks.client`` to; checked against the test's ``fires`` marker."""
    return HookRecorder()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    # After the test passed (a failure is reported as it is): the hooks it
    # says it fires must have fired, or it fails.
    result = yield
    marker = item.get_closest_marker("fires")
    if marker is None:
        return result
    unknown = sorted(set(marker.args) - set(hook_names()))
    if not marker.args or unknown:
        pytest.fail(f"fires() takes hook names, not {unknown or 'none'}", pytrace=False)
    recorder = getattr(item, "funcargs", {}).get("hooks")
    if not isinstance(recorder, HookRecorder):
        pytest.fail(
            "a test marked fires() must use the hooks fixture and give"
            " hooks.server or hooks.client to what it builds",
            pytrace=False,
        )
    silent = [hook for hook in marker.args if recorder.count(hook) == 0]
    if silent:
        pytest.fail(
            f"marked fires({', '.join(map(repr, marker.args))}), but"
            f" {', '.join(silent)} never fired; fired:"
            f" {', '.join(dict.fromkeys(recorder.calls)) or 'nothing'}",
            pytrace=False,
        )
    return result
