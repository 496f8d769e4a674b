"""The node's task supervisor: every task a node runs is a child of one ``asyncio.TaskGroup``.

``spawn(coro)`` starts a child whose exceptions are logged (one connection's failure never
stops the node); ``close()`` refuses new tasks and cancels the running ones, after which the
TaskGroup exits at once. No task is ever fire-and-forget.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("starmesh.node")


class Supervisor:
    """Owns the node's TaskGroup children (module docstring)."""

    def __init__(self) -> None:
        self._group: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def attach(self, group: asyncio.TaskGroup) -> None:
        self._group = group

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` as a child of the TaskGroup; a closed supervisor closes ``coro``."""
        if self._group is None or self._closed:
            coro.close()
            return
        task = self._group.create_task(_logged(coro))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: coro.close())  # a task cancelled before it ran

    def close(self) -> None:
        """Refuse new tasks and cancel every running one."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()


async def _logged(coro: Coroutine[Any, Any, None]) -> None:
    try:
        await coro
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("task failed")
