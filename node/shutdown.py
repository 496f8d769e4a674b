"""SIGINT/SIGTERM end a node process within a bounded time, whatever state it is in.

The first signal asks the node to leave gracefully (``request_stop``: the leave is gossiped,
links say goodbye) and starts a watchdog thread; if the process has not exited
``deadline`` seconds later (a handler stuck, the event loop blocked), the watchdog logs it
and ends the process with ``os._exit(EXIT_FORCED)``. A second signal ends it at once. The
watchdog is a thread, not a loop timer, because a blocked loop is what it guards against.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

log = logging.getLogger("starmesh.node")

#: Seconds from the first signal to a forced exit.
STOP_DEADLINE_S = 5.0
#: Exit code of a process the watchdog had to end (the leave may not have been announced).
EXIT_FORCED = 3


class StopSignals:
    """Installs the handlers on ``loop`` (module docstring)."""

    def __init__(self, request_stop: Callable[[], None], *, deadline: float = STOP_DEADLINE_S,
                 exit_: Callable[[int], None] = os._exit) -> None:
        self._request_stop = request_stop
        self._deadline = deadline
        self._exit = exit_
        self._watchdog: threading.Timer | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.on_signal)

    def on_signal(self) -> None:
        if self._watchdog is not None:
            log.warning("second stop signal: exiting now")
            self._force()
            return
        self._watchdog = threading.Timer(self._deadline, self._expired)
        self._watchdog.daemon = True
        self._watchdog.start()
        self._request_stop()

    def cancel(self) -> None:
        """The node stopped in time: no forced exit."""
        if self._watchdog is not None:
            self._watchdog.cancel()

    def _expired(self) -> None:
        log.error("the node did not stop within %.0f s of the signal: exiting now", self._deadline)
        self._force()

    def _force(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self._exit(EXIT_FORCED)
