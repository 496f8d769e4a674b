"""``node.shutdown.StopSignals``: a stop signal ends the process within a bounded time."""

from __future__ import annotations

import threading

from node.shutdown import EXIT_FORCED, StopSignals


def test_first_signal_requests_stop_and_a_second_exits_at_once() -> None:
    stops: list[int] = []
    exits: list[int] = []
    signals = StopSignals(lambda: stops.append(1), deadline=60.0, exit_=exits.append)
    signals.on_signal()
    assert stops == [1] and exits == []
    signals.on_signal()
    assert exits == [EXIT_FORCED]
    signals.cancel()


def test_watchdog_forces_exit_when_the_node_does_not_stop() -> None:
    forced = threading.Event()
    codes: list[int] = []

    def exit_(code: int) -> None:
        codes.append(code)
        forced.set()

    signals = StopSignals(lambda: None, deadline=0.01, exit_=exit_)
    signals.on_signal()
    assert forced.wait(10.0)  # the watchdog thread fired: bounded, not a timing assertion
    assert codes == [EXIT_FORCED]


def test_cancel_after_a_clean_stop_never_exits() -> None:
    codes: list[int] = []
    signals = StopSignals(lambda: None, deadline=0.05, exit_=codes.append)
    signals.on_signal()
    signals.cancel()
    assert signals._watchdog is not None
    signals._watchdog.join(5.0)
    assert codes == []
