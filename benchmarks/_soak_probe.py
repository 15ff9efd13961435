"""A server plugin for ``benchmarks/soak.py``: counts the server's trio tasks.

Loaded into the server under test with ``--plugin _soak_probe:TaskCounter``
(``benchmarks/`` on ``PYTHONPATH``). Once the server listens, a trio system
task writes ``{"time": ..., "tasks": N}`` to the file named by
``CHATKIT_SOAK_STATS`` every second (atomically: write, then rename), where N
is the number of tasks in the whole trio task tree. It does nothing when the
variable is unset.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import trio

import chatkit

INTERVAL = 1.0


def count_tasks() -> int:
    """Every task reachable from trio's root task, the root included."""
    count = 0
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        if task is None:
            continue
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


async def report(path: Path) -> None:
    partial = path.with_suffix(".tmp")
    while True:
        stats = {"time": time.time(), "tasks": count_tasks()}
        # A blocking write of a few bytes to a local file, once a second:
        # trio.Path would start a worker thread in the server under test.
        try:
            partial.write_text(json.dumps(stats))
            partial.replace(path)
        except OSError:
            # The soak run owns the directory; if it is gone, so is the run.
            return
        await trio.sleep(INTERVAL)


class TaskCounter:
    @chatkit.hookimpl
    def chatkit_server_started(self, server: chatkit.ChatServer) -> None:
        path = os.environ.get("CHATKIT_SOAK_STATS")
        if path:
            # A system task: it ends with the run, and counting needs no
            # nursery of the server's.
            trio.lowlevel.spawn_system_task(report, Path(path), name="soak-probe")
