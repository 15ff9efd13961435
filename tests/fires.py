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
fails too). :func:`firing_tests` lists, by collecting a test module the
way pytest does, which tests are marked to fire each hook:
tests/test_docs.py checks every hook has one.

Loaded as a plugin by tests/conftest.py (the marker is registered in
pyproject.toml).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Generator, Mapping, Sequence
from pathlib import Path

import pytest

from chatkit import _hooks, hookspecs
from chatkit.testing import HookRecorder

ROOT = Path(__file__).resolve().parent.parent


def hook_names() -> list[str]:
    """Every server and client hook, sorted."""
    return sorted(
        _hooks.hook_names(hookspecs.ServerSpec)
        | _hooks.hook_names(hookspecs.ClientSpec)
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


# --- which tests fire which hook ----------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fires-report",
        metavar="PATH",
        help="write to PATH, as JSON, the tests marked fires() for each hook",
    )


def pytest_collection_finish(session: pytest.Session) -> None:
    path = session.config.getoption("fires_report")
    if path is None:
        return
    firing: dict[str, list[str]] = {}
    for item in session.items:
        for marker in item.iter_markers("fires"):
            for hook in marker.args:
                firing.setdefault(hook, []).append(item.nodeid)
    Path(path).write_text(json.dumps(firing))


def firing_tests(module: Path, tmp_path: Path) -> dict[str, list[str]]:
    """For each hook, the tests in ``module`` marked to fire it, as pytest
    collects them (in a run of its own, so that which tests this run
    selects does not matter): node ids by hook name."""
    report = tmp_path / "fires.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), env.get("PYTHONPATH")])
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "tests.fires",
            f"--fires-report={report}",
            str(module),
        ],
        cwd=module.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    firing: dict[str, list[str]] = json.loads(report.read_text())
    return firing


def check_fired_by_a_test(hook: str, firing: Mapping[str, Sequence[str]]) -> None:
    """Fail unless some test is marked to fire ``hook`` (see
    :func:`firing_tests`)."""
    if not firing.get(hook):
        raise AssertionError(
            f"no test is marked @pytest.mark.fires({hook!r}): write one that"
            " fires it (through a server or client given hooks.server or"
            " hooks.client) and checks what it did"
        )
