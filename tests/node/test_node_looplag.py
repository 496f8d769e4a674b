"""``node.looplag``: the sans-I/O lag record on explicit times, the monitor on a real loop,
and the guard that keeps torch's import off event-loop threads (fresh subprocesses)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from node.core import Histogram
from node.looplag import LAG_BUCKETS, LoopLag, LoopLagMonitor
from node.metrics import METRICS, flatten

ROOT = Path(__file__).resolve().parents[2]


def test_ticks_record_how_late_they_ran() -> None:
    lag = LoopLag(now=0.0, interval=0.1, window=10.0)
    assert lag.next_deadline() == pytest.approx(0.1)
    lag.handle_timer(now=0.1)
    assert lag.current == 0.0 and lag.next_deadline() == pytest.approx(0.2)
    lag.handle_timer(now=2.2)  # the loop was blocked ~2 s: one tick, 2 s late
    assert lag.current == pytest.approx(2.0) and lag.max_lag == pytest.approx(2.0)
    assert lag.next_deadline() == pytest.approx(2.3)  # the next one interval after it ran, no burst
    lag.handle_timer(now=lag.next_deadline())  # on time
    assert lag.current == 0.0 and lag.max_lag == pytest.approx(2.0)
    assert lag.histogram.count == 3
    assert lag.histogram.cumulative()[0] == ("0.001", 2)


def test_an_early_fire_is_not_a_tick() -> None:
    lag = LoopLag(now=0.0, interval=0.1)
    lag.handle_timer(now=0.1 - 1e-9)
    assert lag.histogram.count == 0 and lag.next_deadline() == pytest.approx(0.1)


def test_recent_max_forgets_after_the_window() -> None:
    lag = LoopLag(now=0.0, interval=1.0, window=10.0)
    lag.record(1.0, 1.5)   # 0.5 at t=1.5
    lag.record(2.5, 2.8)   # 0.3 at t=2.8
    lag.record(3.8, 3.9)   # 0.1 at t=3.9
    assert lag.recent_max(now=4.0) == pytest.approx(0.5)
    assert lag.recent_max(now=11.6) == pytest.approx(0.3)  # the 0.5 left the window
    assert lag.recent_max(now=12.9) == pytest.approx(0.1)
    assert lag.recent_max(now=14.0) == 0.0
    assert lag.max_lag == pytest.approx(0.5)
    lag.record(20.0, 20.2)
    lag.record(21.0, 21.7)  # a larger lag replaces the smaller ones before it
    assert lag.recent_max(now=21.7) == pytest.approx(0.7)


def test_peak_is_per_phase_and_never_negative() -> None:
    lag = LoopLag(now=0.0, interval=1.0)
    lag.record(1.0, 1.4)
    assert lag.take_peak() == pytest.approx(0.4) and lag.take_peak() == 0.0
    lag.record(2.0, 1.9999)  # ran a hair early: lag 0
    assert lag.current == 0.0 and lag.take_peak() == 0.0 and lag.max_lag == pytest.approx(0.4)


def test_stats_are_named_metrics() -> None:
    lag = LoopLag(now=0.0, interval=1.0)
    lag.record(1.0, 1.25)
    stats = lag.stats(now=1.25)
    assert stats["loop_lag_seconds"] == pytest.approx(0.25)
    assert stats["loop_lag_max_seconds"] == pytest.approx(0.25)
    hist = stats["loop_lag_tick_seconds"]
    assert isinstance(hist, Histogram) and tuple(hist.bounds) == LAG_BUCKETS
    assert {"loop_lag_seconds", "loop_lag_max_seconds", "loop_lag_tick_seconds"} <= set(METRICS)
    assert flatten(stats)['loop_lag_tick_seconds_bucket{le="0.25"}'] == 1.0


def test_bad_interval_is_refused() -> None:
    with pytest.raises(ValueError):
        LoopLag(now=0.0, interval=0.0)


async def test_monitor_sees_a_blocked_loop() -> None:
    monitor = LoopLagMonitor(interval=0.02)
    monitor.start()
    try:
        await asyncio.sleep(0.05)
        time.sleep(0.2)  # block the loop
        await asyncio.sleep(0.05)
        stats = monitor.stats()
        assert float(stats["loop_lag_max_seconds"]) >= 0.15 and monitor.take_peak() >= 0.15  # type: ignore[arg-type]
    finally:
        monitor.stop()


# ---------------------------------------------------------------- torch off the loop thread

#: Records every lookup of torch (or a submodule) that is part of a real import, by thread.
_FINDER = '''
import sys, threading
IMPORTS = []
class Finder:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            frames, f = [], sys._getframe(1)
            while f is not None:
                frames.append(f.f_code.co_name)
                f = f.f_back
            if "_find_and_load_unlocked" in frames:  # an import, not importlib.util.find_spec
                IMPORTS.append(threading.current_thread().name)
        return None
sys.meta_path.insert(0, Finder)
'''


def _run(script: str) -> dict[str, object]:
    code = _FINDER + textwrap.dedent(script)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _torch_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


needs_torch = pytest.mark.skipif(not _torch_installed(), reason="torch is not installed")


@needs_torch
def test_fp16_on_the_loop_thread_defers_the_import() -> None:
    """An fp16 encode and decode called on an event loop's thread take the numpy path at once;
    torch is imported on the codec thread, after which casts give the same bytes through it."""
    out = _run('''
        import asyncio, concurrent.futures, json
        import numpy as np
        from node.looplag import guard_torch_import
        from protocol.tensor import CodecSpec, decode_chunk, encode_chunk, fastcast

        async def main():
            pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="codec")
            guard_torch_import(pool)
            x = np.random.default_rng(0).standard_normal(100_000, dtype=np.float32)
            codec = CodecSpec.parse("fp16")
            first = encode_chunk(x, codec, offset=0)     # on the loop thread
            back = decode_chunk(first)
            loaded_then = fastcast.loaded()
            for _ in range(2000):
                if fastcast.loaded():
                    break
                await asyncio.sleep(0.01)
            again = await asyncio.get_running_loop().run_in_executor(pool, encode_chunk, x, codec)
            same = bytes(first.payload) == bytes(again.payload)
            same_back = np.array_equal(back, decode_chunk(again))
            pool.shutdown()
            return loaded_then, same, same_back

        loaded_then, same, same_back = asyncio.run(main())
        print(json.dumps({"imports": IMPORTS, "loaded_then": loaded_then, "same": same,
                          "same_back": same_back, "torch": "torch" in sys.modules}))
    ''')
    assert out["torch"] is True and out["loaded_then"] is False
    assert out["imports"] and "MainThread" not in out["imports"]  # type: ignore[operator]
    assert out["same"] is True and out["same_back"] is True


@needs_torch
def test_a_nodes_first_fp16_round_imports_torch_off_the_loop() -> None:
    out = _run('''
        import asyncio, json, tempfile
        from pathlib import Path
        import numpy as np
        from discovery.members import MemberStatus
        from node.config import Address, NodeConfig
        from node.runtime import Node

        async def main():
            root = Path(tempfile.mkdtemp())
            def config(name, seeds=()):
                return NodeConfig(listen=Address("127.0.0.1", 0), data_dir=root / name,
                                  mesh_key_file=root / "mesh.key", seeds=seeds, preset="test",
                                  use_uvloop=False)
            async with Node(config("a")) as a:
                seed = (Address("127.0.0.1", int(a.address.rsplit(":", 1)[1])),)
                async with Node(config("b", seed)) as b:
                    def alive(n):
                        return sum(m.status is MemberStatus.ALIVE for m in n.members())
                    while alive(a) < 2 or alive(b) < 2:
                        await asyncio.sleep(0.01)
                    group = sorted([a.node_id, b.node_id])
                    x = np.ones(200_000, np.float32)
                    outs = await asyncio.gather(*(n.all_reduce(x, group=group, codec="fp16", timeout=60)
                                                  for n in (a, b)))
                    lag = max(float(n.stats()["loop_lag_max_seconds"]) for n in (a, b))
                    return [float(o.tensor[0]) for o in outs], lag

        values, lag = asyncio.run(main())
        print(json.dumps({"imports": IMPORTS, "values": values, "lag": lag,
                          "torch": "torch" in sys.modules}))
    ''')
    assert out["values"] == [1.0, 1.0]
    assert out["torch"] is True and out["imports"]
    assert "MainThread" not in out["imports"]  # type: ignore[operator]
    assert isinstance(out["lag"], float)
