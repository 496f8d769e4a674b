"""Event-loop lag: how late the loop runs a timer, measured by the loop itself.

Theory of operation
-------------------
``LoopLag`` is a sans-I/O core: it wants a tick every ``interval`` seconds
(``next_deadline()``); ``handle_timer(now=)`` records ``lag = now - deadline`` (how late the
tick ran; never negative) and asks for the next tick ``interval`` after ``now``, so a long
stall counts once instead of as a burst of catch-up ticks. A callback that blocks the
loop for 2 s makes the next tick run ~2 s late: the lag is the stall. Nothing is measured
while the loop is blocked; the stall is seen by the first tick after it. A process stopped
by SIGSTOP shows its freeze the same way (the monotonic clock ran on).

It keeps the last lag (``current``), the largest since start (``max_lag``), the largest of
the last ``window`` seconds (``recent_max``: a max-queue, O(1) per tick, so a poll every few
seconds still sees a short stall between two polls), the largest since the last
``take_peak()`` (for a caller measuring one phase, such as ``bench allreduce`` per codec),
and a cumulative ``Histogram`` of every tick's lag. ``stats()``:

* ``loop_lag_seconds`` (gauge): ``recent_max``;
* ``loop_lag_max_seconds`` (gauge): ``max_lag``;
* ``loop_lag_tick_seconds`` (histogram): each tick's lag.

``LoopLagMonitor`` runs one on the running loop through ``node.driver.Driver`` (one
``loop.call_at`` at the core's deadline); ``Node`` starts it first and stops it last.

``TorchImportGuard`` keeps the one known multi-second stall off event loops: the first
fp16/bf16 cast imports torch (``protocol.tensor.fastcast``); on a thread running an event
loop it is refused (that call takes the bit-identical numpy path) and the import is handed
to a worker thread (the node's codec pool) instead.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading

from node.core import Histogram, Stats
from node.driver import Driver
from protocol.tensor import fastcast

#: Seconds between two ticks: the resolution of the measurement (a tick costs ~10 us).
INTERVAL_S = 0.1
#: Seconds ``loop_lag_seconds`` looks back.
WINDOW_S = 10.0
#: Histogram bounds (seconds) of one tick's lag.
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LoopLag:
    """Sans-I/O record of tick lateness (module docstring). Feed ``handle_timer(now=)`` at
    (or after) ``next_deadline()``; read ``stats()``."""

    __slots__ = ("_deadline", "_recent", "current", "histogram", "interval", "max_lag",
                 "peak_lag", "window")

    def __init__(self, *, now: float, interval: float = INTERVAL_S, window: float = WINDOW_S) -> None:
        if interval <= 0 or window < interval:
            raise ValueError("LoopLag needs 0 < interval <= window")
        self.interval = interval
        self.window = window
        self._deadline = now + interval
        self.current = 0.0
        """The lag of the last tick."""
        self.max_lag = 0.0
        """The largest lag since start."""
        self.peak_lag = 0.0
        """The largest lag since the last ``take_peak()``."""
        self.histogram = Histogram(LAG_BUCKETS)
        self._recent: collections.deque[tuple[float, float]] = collections.deque()
        """(time, lag) of the ticks in the window whose lag no later tick exceeded: lags
        strictly decreasing from left to right, so the window's max is the leftmost."""

    def next_deadline(self) -> float:
        return self._deadline

    def handle_timer(self, *, now: float) -> None:
        """A tick ran at ``now``: record how late it is (if it is due), ask for the next."""
        if now < self._deadline:  # early (a clock-resolution early fire): not a tick yet
            return
        self.record(self._deadline, now)
        self._deadline = now + self.interval

    def record(self, scheduled: float, actual: float) -> None:
        """One tick meant for ``scheduled`` ran at ``actual``."""
        lag = max(0.0, actual - scheduled)
        self.current = lag
        self.max_lag = max(self.max_lag, lag)
        self.peak_lag = max(self.peak_lag, lag)
        self.histogram.observe(lag)
        recent = self._recent
        while recent and recent[-1][1] <= lag:
            recent.pop()
        recent.append((actual, lag))
        while recent[0][0] < actual - self.window:
            recent.popleft()

    def recent_max(self, *, now: float) -> float:
        """The largest lag of the ticks in ``(now - window, now]`` (0 if none)."""
        recent = self._recent
        while recent and recent[0][0] < now - self.window:
            recent.popleft()
        return recent[0][1] if recent else 0.0

    def take_peak(self) -> float:
        """The largest lag since the previous call (or start); starts a new phase."""
        peak, self.peak_lag = self.peak_lag, 0.0
        return peak

    def stats(self, *, now: float) -> Stats:
        return {
            "loop_lag_seconds": self.recent_max(now=now),
            "loop_lag_max_seconds": self.max_lag,
            "loop_lag_tick_seconds": self.histogram,
        }


class LoopLagMonitor:
    """A ``LoopLag`` ticking on the running event loop: ``start()``, ``stats()``, ``stop()``."""

    def __init__(self, *, interval: float = INTERVAL_S, window: float = WINDOW_S) -> None:
        self._interval = interval
        self._window = window
        self._loop: asyncio.AbstractEventLoop | None = None
        self._core: LoopLag | None = None
        self._driver: Driver | None = None

    def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._core = LoopLag(now=loop.time(), interval=self._interval, window=self._window)
        self._driver = Driver(self._core, drain=_nothing, loop=loop)
        self._driver.step()

    def stop(self) -> None:
        if self._driver is not None:
            self._driver.stop()

    @property
    def core(self) -> LoopLag | None:
        """The measurements (None before ``start``)."""
        return self._core

    @property
    def max_lag(self) -> float:
        """The worst lag since start (0 before start)."""
        return self._core.max_lag if self._core is not None else 0.0

    def take_peak(self) -> float:
        """The worst lag since the previous call (``LoopLag.take_peak``); 0 before start."""
        return self._core.take_peak() if self._core is not None else 0.0

    def stats(self) -> Stats:
        if self._core is None or self._loop is None:
            return {}
        return self._core.stats(now=self._loop.time())


def _nothing() -> None:
    """A ``LoopLag`` has no outputs to drain."""


class TorchImportGuard:
    """``fastcast.ImportGuard`` for a process running event loops: a thread with a running
    loop never waits for torch to import; the import runs once on ``executor`` (or, when that
    is shut down, on a thread of its own)."""

    def __init__(self, executor: concurrent.futures.Executor) -> None:
        self.executor = executor
        self._lock = threading.Lock()
        self._started = False

    def use(self, executor: concurrent.futures.Executor) -> None:
        """Run the import on ``executor`` from now on, if it has not been started yet."""
        with self._lock:
            if not self._started:
                self.executor = executor

    def may_block(self) -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return True
        return False

    def import_later(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        try:
            self.executor.submit(fastcast.preload_torch)
        except RuntimeError:  # the executor is shut down (its node stopped)
            threading.Thread(target=fastcast.preload_torch, name="starmesh-torch-import",
                             daemon=True).start()


def guard_torch_import(executor: concurrent.futures.Executor) -> None:
    """Install a ``TorchImportGuard`` for this process (once; a later node's executor takes
    over the background import if it has not started yet)."""
    guard = fastcast.import_guard()
    if isinstance(guard, TorchImportGuard):
        guard.use(executor)
    else:
        fastcast.set_import_guard(TorchImportGuard(executor))
