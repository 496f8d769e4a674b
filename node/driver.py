"""One driver for every sans-I/O core on the event loop: feed, drain, re-arm one timer.

Theory of operation
-------------------
A core (``protocol.Connection``, ``discovery.Swim``, an all-reduce round, later task
coordinators and blob fetches) never touches the clock: it is told ``now=`` and reports
``next_deadline()``. Its adapter owns one ``Driver``, and after *any* input to the core it
calls ``driver.step()``, which

1. calls the adapter's ``drain()`` (write ``messages_to_send()``, handle ``next_event()``),
2. re-arms exactly one ``loop.call_at(core.next_deadline())`` (cancelled and replaced only
   when the deadline moved; none when the core has none).

When the timer fires the driver calls ``core.handle_timer(now=loop.time())`` and steps.
``stop()`` cancels the timer for good; later steps still drain but arm nothing.

Invariant: at most one timer per core, always at the core's current ``next_deadline()``
after the last input (uvloop returns a plain ``Handle`` with no ``when()`` for deadlines in
the past, so the armed time is remembered here).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from node.core import Core


class Driver:
    """Runs ``core`` on the running event loop (see module docstring)."""

    __slots__ = ("_at", "_core", "_drain", "_loop", "_stopped", "_timer")

    def __init__(self, core: Core, *, drain: Callable[[], None],
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._core = core
        self._drain = drain
        self._loop = loop or asyncio.get_running_loop()
        self._timer: asyncio.Handle | None = None
        self._at: float | None = None
        self._stopped = False

    def now(self) -> float:
        """The event loop's clock: what every input to the core passes as ``now=``."""
        return self._loop.time()

    @property
    def stopped(self) -> bool:
        return self._stopped

    def step(self) -> None:
        """After any input: drain the core's outputs, then re-arm its one timer."""
        self._drain()
        self._arm()

    def stop(self) -> None:
        """No more timers (the core is done or its owner is closing)."""
        self._stopped = True
        self._cancel()

    def _arm(self) -> None:
        at = None if self._stopped else self._core.next_deadline()
        if self._timer is not None and at != self._at:
            self._cancel()
        if at is not None and self._timer is None:
            self._timer = self._loop.call_at(at, self._fire)
            self._at = at

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._at = None

    def _fire(self) -> None:
        self._timer = self._at = None
        if self._stopped:
            return
        self._core.handle_timer(now=self._loop.time())
        self.step()
