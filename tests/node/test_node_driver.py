"""``node.driver.Driver``: one timer per core, always at the core's current deadline."""

from __future__ import annotations

from typing import Any

from node.driver import Driver


class FakeHandle:
    def __init__(self, loop: FakeLoop, at: float, callback: Any) -> None:
        self.loop, self.at, self.callback, self.cancelled = loop, at, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """Just enough of an event loop: a clock and ``call_at`` handles, fired by the test."""

    def __init__(self) -> None:
        self.now = 0.0
        self.handles: list[FakeHandle] = []

    def time(self) -> float:
        return self.now

    def call_at(self, at: float, callback: Any) -> FakeHandle:
        handle = FakeHandle(self, at, callback)
        self.handles.append(handle)
        return handle

    def armed(self) -> list[float]:
        return [h.at for h in self.handles if not h.cancelled]

    def fire(self) -> None:
        (handle,) = [h for h in self.handles if not h.cancelled]
        handle.cancelled = True
        self.now = handle.at
        handle.callback()


class Core:
    def __init__(self) -> None:
        self.deadline: float | None = None
        self.timers: list[float] = []

    def next_deadline(self) -> float | None:
        return self.deadline

    def handle_timer(self, *, now: float) -> None:
        self.timers.append(now)
        self.deadline = None if self.deadline is None else self.deadline + 10.0


def make() -> tuple[FakeLoop, Core, Driver, list[int]]:
    loop, core, drained = FakeLoop(), Core(), []
    driver = Driver(core, drain=lambda: drained.append(1), loop=loop)  # type: ignore[arg-type]
    return loop, core, driver, drained


def test_step_drains_then_arms_one_timer_at_the_deadline() -> None:
    loop, core, driver, drained = make()
    driver.step()
    assert drained == [1] and loop.armed() == []
    core.deadline = 5.0
    driver.step()
    driver.step()
    assert loop.armed() == [5.0]  # not re-armed while the deadline is unchanged
    core.deadline = 3.0
    driver.step()
    assert loop.armed() == [3.0]  # the old timer was cancelled


def test_timer_feeds_the_core_its_time_and_rearms() -> None:
    loop, core, driver, drained = make()
    core.deadline = 2.0
    driver.step()
    loop.fire()
    assert core.timers == [2.0] and loop.armed() == [12.0] and len(drained) == 2


def test_stop_cancels_and_arms_nothing_more() -> None:
    loop, core, driver, _ = make()
    core.deadline = 2.0
    driver.step()
    driver.stop()
    assert loop.armed() == [] and driver.stopped
    driver.step()
    assert loop.armed() == []


def test_deadline_gone_cancels_the_timer() -> None:
    loop, core, driver, _ = make()
    core.deadline = 2.0
    driver.step()
    core.deadline = None
    driver.step()
    assert loop.armed() == []
