"""``node.process_pool`` with real worker processes: every way a subtask can fail is an
outcome, the pool keeps serving, and worker processes never outlive their node."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from node.process_pool import ProcessPool, _Attempt, _Slots
from protocol.messages.tasks import MAX_VALUE_BYTES, Outcome, Resources, pack_value, unpack_value

ROOT = Path(__file__).resolve().parents[2]

JOB = '''
import ctypes, os, sys, time

def triple(x):
    return 3 * x

def pid(x):
    return os.getpid()

def boom(x):
    raise ValueError(f"bad input {x}")

def chatty(x):
    print("hello from", x)
    print("to stderr", file=sys.stderr)
    raise RuntimeError("after printing")

def exit3(x):
    os._exit(3)

def die_on(x):
    if x == "die":
        os._exit(3)
    return os.getpid()

def segfault(x):
    ctypes.string_at(0)

def nap(x):
    time.sleep(x)
    return x

def hog(x):
    return len(bytearray(x * 1024 * 1024))

def opaque(x):
    return object()

def huge(x):
    return b"x" * (x + 1)

def garbage(x):
    fd = int(sys.argv[sys.argv.index("--reply-fd") + 1])
    os.write(fd, b"\\x00\\x00\\x00\\x01\\xc1")
    time.sleep(30)

def forge(x):
    import msgpack
    fd = int(sys.argv[sys.argv.index("--reply-fd") + 1])
    body = msgpack.packb({"attempt": x, "index": 0, "ok": True, "value": b"\\xc3", "failure": None})
    os.write(fd, len(body).to_bytes(4, "big") + body)
    return "real"

def leave(x):
    sys.exit(7)

def pid_or_nap(x):
    if x == "pid":
        return os.getpid()
    time.sleep(x)
'''


@pytest.fixture
def job(tmp_path: Path) -> Path:
    root = tmp_path / "job"
    root.mkdir()
    (root / "job.py").write_text(JOB)
    (root / "broken.py").write_text("raise RuntimeError('broken at import')\n")
    return root


@pytest.fixture
async def pool() -> AsyncIterator[ProcessPool]:
    p = ProcessPool(slots=2)
    try:
        yield p
    finally:
        await p.close()
        assert p.stats()["processes_live"] == 0


async def _run(pool: ProcessPool, function: str, values: list[Any], *, bundle: Path | None,
               timeout_s: float = 30.0, resources: Resources | None = None, attempt: int = 1,
               on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    return await pool.run(attempt=attempt, function=function, bundle_path=bundle,
                          items=[(i, pack_value(v)) for i, v in enumerate(values)],
                          timeout_s=timeout_s, resources=resources or Resources(),
                          on_outcome=on_outcome)


def _values(outcomes: list[Outcome]) -> list[Any]:
    assert all(o.ok for o in outcomes), [o.failure for o in outcomes]
    return [unpack_value(o.value) for o in outcomes]


async def test_values_in_order_and_streamed(pool: ProcessPool, job: Path) -> None:
    seen: list[int] = []
    out = await _run(pool, "job:triple", [1, 2, 3, "ab"], bundle=job, on_outcome=lambda o: seen.append(o.index))
    assert [o.index for o in out] == [0, 1, 2, 3] == seen
    assert _values(out) == [3, 6, 9, "ababab"]
    assert pool.stats()["processes_started_total"] == 1


async def test_a_raise_carries_type_message_traceback(pool: ProcessPool, job: Path) -> None:
    [out] = await _run(pool, "job:boom", [5], bundle=job)
    assert not out.ok and out.failure is not None
    assert (out.failure.type, out.failure.message) == ("ValueError", "bad input 5")
    assert out.failure.traceback.startswith("Traceback (most recent call last):")
    assert "job.py" in out.failure.traceback and 'in boom' in out.failure.traceback
    assert "task_worker" not in out.failure.traceback
    assert pool.stats()["subtask_failures_total"] == 1


async def test_output_tails(pool: ProcessPool, job: Path) -> None:
    [first, second] = await _run(pool, "job:chatty", ["one", "two"], bundle=job)
    assert first.failure is not None and second.failure is not None
    assert first.failure.stdout == "hello from one\n" and first.failure.stderr == "to stderr\n"
    assert second.failure.stdout == "hello from two\n"  # this item's output only


async def test_exit_is_a_crash_and_the_pool_still_serves(pool: ProcessPool, job: Path) -> None:
    [out] = await _run(pool, "job:exit3", [0], bundle=job)
    assert out.failure is not None and out.failure.type == "WorkerCrashed"
    assert "exit code 3" in out.failure.message
    assert _values(await _run(pool, "job:triple", [2], bundle=job, attempt=2)) == [6]
    assert pool.stats()["processes_started_total"] == 2


async def test_the_rest_of_a_batch_reruns_on_a_fresh_process(pool: ProcessPool, job: Path) -> None:
    out = await _run(pool, "job:die_on", [0, "die", 2], bundle=job)
    assert [o.ok for o in out] == [True, False, True]
    assert out[1].failure is not None and out[1].failure.type == "WorkerCrashed"
    assert unpack_value(out[0].value) != unpack_value(out[2].value)


async def test_segfault_reports_the_signal(pool: ProcessPool, job: Path) -> None:
    [out] = await _run(pool, "job:segfault", [0], bundle=job)
    assert out.failure is not None and out.failure.type == "WorkerCrashed"
    assert "SIGSEGV" in out.failure.message
    assert "Segmentation fault" in out.failure.stderr  # faulthandler's dump, drained
    assert "job.py" in out.failure.stderr


async def test_timeout_kills_and_the_rest_reruns(pool: ProcessPool, job: Path) -> None:
    out = await _run(pool, "job:nap", [30, 0], bundle=job, timeout_s=0.5)
    assert out[0].failure is not None and out[0].failure.type == "Timeout"
    assert "0.5 s" in out[0].failure.message
    assert _values(out[1:]) == [0]
    assert pool.stats()["processes_started_total"] == 2


async def test_memory_limit(pool: ProcessPool, job: Path) -> None:
    limited = Resources(memory_mb=200)
    [big, small] = await _run(pool, "job:hog", [1024, 10], bundle=job, resources=limited)
    assert big.failure is not None and big.failure.type == "MemoryError"
    assert _values([small]) == [10 * 1024 * 1024]  # the same process goes on


async def test_results_that_cannot_travel(pool: ProcessPool, job: Path) -> None:
    [opaque] = await _run(pool, "job:opaque", [0], bundle=job)
    assert opaque.failure is not None and opaque.failure.type == "NotSerializable"
    [huge] = await _run(pool, "job:huge", [MAX_VALUE_BYTES], bundle=job, attempt=2)
    assert huge.failure is not None and huge.failure.type == "ResultTooLarge"
    assert pool.stats()["processes_started_total"] == 1


async def test_garbage_on_the_reply_pipe_is_bad_result(pool: ProcessPool, job: Path) -> None:
    [out] = await _run(pool, "job:garbage", [0], bundle=job)
    assert out.failure is not None and out.failure.type == "BadResult"
    assert pool.stats()["processes_live"] <= 1  # killed (its reaping may still be under way)


async def test_a_reply_too_many_kills_the_process(pool: ProcessPool, job: Path) -> None:
    """The function forges its own reply: that one counts, the real one is one too many."""
    [out] = await _run(pool, "job:forge", [1], bundle=job)
    assert _values([out]) == [True]
    assert _values(await _run(pool, "job:triple", [1], bundle=job, attempt=2)) == [3]
    assert pool.stats()["processes_started_total"] == 2


async def test_sys_exit_fails_the_item_only(pool: ProcessPool, job: Path) -> None:
    [left] = await _run(pool, "job:leave", [0], bundle=job)
    assert left.failure is not None and left.failure.type == "SystemExit"
    assert _values(await _run(pool, "job:triple", [1], bundle=job, attempt=2)) == [3]
    assert pool.stats()["processes_started_total"] == 1


async def test_warm_reuse(pool: ProcessPool, job: Path) -> None:
    [a] = _values(await _run(pool, "job:pid", [0], bundle=job))
    [b] = _values(await _run(pool, "job:pid", [0], bundle=job, attempt=2))
    assert a == b and pool.stats()["processes_started_total"] == 1
    assert pool.stats()["processes_warm"] == 1
    # Another key (resources) is another process.
    [c] = _values(await _run(pool, "job:pid", [0], bundle=job, attempt=3, resources=Resources(cpus=2.0)))
    assert c != a and pool.stats()["processes_warm"] == 2


async def test_module_policy(pool: ProcessPool, job: Path) -> None:
    [outside] = await _run(pool, "json:dumps", [1], bundle=job)
    assert outside.failure is not None and outside.failure.type == "NotAllowed"
    assert "not in the bundle" in outside.failure.message
    [bare] = await _run(pool, "os:getpid", [1], bundle=None, attempt=2)
    assert bare.failure is not None and bare.failure.type == "NotAllowed"
    [nobundle] = await _run(pool, "job:triple", [1], bundle=None, attempt=3)
    assert nobundle.failure is not None and nobundle.failure.type == "NotAllowed"
    assert _values(await _run(pool, "node.tasks.builtins:double", [21, "ab"], bundle=None, attempt=4)) == [42, "abab"]
    # Allowed modules run with a bundle too.
    assert _values(await _run(pool, "node.tasks.builtins:square", [3], bundle=job, attempt=5)) == [9]


async def test_import_failures_fail_every_item(pool: ProcessPool, job: Path) -> None:
    out = await _run(pool, "broken:f", [1, 2], bundle=job)
    assert [o.failure.type if o.failure else None for o in out] == ["RuntimeError"] * 2
    assert out[0].failure is not None and "broken at import" in out[0].failure.message
    [missing] = await _run(pool, "job:nothing", [1], bundle=job, attempt=2)
    assert missing.failure is not None and missing.failure.type == "AttributeError"
    [unknown] = await _run(pool, "nomodule:f", [1], bundle=job, attempt=3)
    assert unknown.failure is not None and unknown.failure.type == "ModuleNotFoundError"


async def test_allow_patterns(job: Path) -> None:
    pool = ProcessPool(slots=1, allow_modules=("js*",))
    try:
        assert _values(await _run(pool, "json:dumps", [[1]], bundle=None)) == ["[1]"]
    finally:
        await pool.close()


async def test_cancel_a_running_attempt(pool: ProcessPool, job: Path) -> None:
    def first(outcome: Outcome) -> None:
        if outcome.index == 0:
            pool.cancel(1)

    out = await _run(pool, "job:pid_or_nap", ["pid", 30, 30], bundle=job, on_outcome=first)
    assert out[0].ok
    assert [o.failure.type if o.failure else None for o in out[1:]] == ["Cancelled", "Cancelled"]
    assert pool.stats()["attempts_running"] == 0


async def test_cancel_a_waiting_attempt(job: Path) -> None:
    pool = ProcessPool(slots=1)
    started = asyncio.Event()
    try:
        a = asyncio.create_task(_run(pool, "job:pid_or_nap", ["pid", 30], bundle=job,
                                     on_outcome=lambda o: started.set()))
        await started.wait()
        b = asyncio.create_task(_run(pool, "job:triple", [1], bundle=job, attempt=2))
        await asyncio.sleep(0)  # let b reach the slot queue
        assert pool.stats()["attempts_running"] == 1
        pool.cancel(2)
        [cancelled] = await b
        assert cancelled.failure is not None and cancelled.failure.type == "Cancelled"
        pool.cancel(1)
        out = await a
        assert out[0].ok and out[1].failure is not None and out[1].failure.type == "Cancelled"
    finally:
        await pool.close()


async def test_close_kills_everything(job: Path) -> None:
    pool = ProcessPool(slots=2)
    started = asyncio.Event()
    busy = asyncio.create_task(_run(pool, "job:pid_or_nap", ["pid", 30], bundle=job,
                                    on_outcome=lambda o: started.set()))
    [idle] = _values(await _run(pool, "job:pid", [0], bundle=job, attempt=2, resources=Resources(cpus=0.5)))
    await started.wait()
    await pool.close()
    out = await busy
    pids = [unpack_value(out[0].value), idle]
    assert out[1].failure is not None and out[1].failure.type == "Cancelled"
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # exited and reaped
    [late] = await _run(pool, "job:triple", [1], bundle=job, attempt=3)
    assert late.failure is not None and late.failure.type == "Cancelled"


async def test_idle_processes_exit(job: Path) -> None:
    pool = ProcessPool(slots=2, idle_s=0.0)
    try:
        [pid] = _values(await _run(pool, "job:pid", [0], bundle=job))
        await asyncio.gather(*list(pool._supervisors))  # the idle timer retires it
        assert pool.stats()["processes_live"] == 0 == pool.stats()["processes_warm"]
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    finally:
        await pool.close()


async def test_at_most_max_idle_processes(job: Path) -> None:
    pool = ProcessPool(slots=4, max_idle_processes=1)
    try:
        for n, cpus in enumerate([1.0, 2.0, 3.0]):
            await _run(pool, "job:pid", [0], bundle=job, attempt=n, resources=Resources(cpus=cpus))
        assert pool.stats()["processes_warm"] == 1
    finally:
        await pool.close()


async def test_threads_pinned_to_the_cpus() -> None:
    pool = ProcessPool(slots=4, allow_modules=("os",))
    try:
        [threads] = _values(await _run(pool, "os:getenv", ["OMP_NUM_THREADS"], bundle=None,
                                       resources=Resources(cpus=2.5)))
        assert threads == "3"
    finally:
        await pool.close()


async def test_slots_bound_concurrency(pool: ProcessPool, job: Path) -> None:
    running: list[float] = []

    def seen(outcome: Outcome) -> None:
        running.append(pool.stats()["attempts_running"])

    runs = [_run(pool, "job:pid", [0, 1], bundle=job, attempt=n, on_outcome=seen) for n in range(6)]
    outs = await asyncio.gather(*runs)
    assert all(o.ok for out in outs for o in out)
    assert max(running) == 2  # slots=2, one cpu each
    assert pool.stats()["processes_started_total"] == 2  # the next attempts took warm ones
    assert len({unpack_value(o.value) for out in outs for o in out}) == 2


async def test_slots_fifo() -> None:
    slots = _Slots(2.0)
    assert await slots.acquire(1.5, _Attempt(1))
    big = asyncio.ensure_future(slots.acquire(5.0, _Attempt(2)))  # the whole node: alone
    small = asyncio.ensure_future(slots.acquire(0.5, _Attempt(3)))  # fits, but waits its turn
    await asyncio.sleep(0)
    assert not big.done() and not small.done()
    slots.release(1.5)
    assert await big and not small.done()
    slots.release(5.0)
    assert await small and slots.used == 0.5


# ---- never outliving the node


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie whose new parent has not reaped it yet has exited too
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (FileNotFoundError, IndexError):
        return True


def _wait_gone(pid: int, within: float) -> None:
    deadline = time.monotonic() + within
    while not _gone(pid):
        assert time.monotonic() < deadline, f"process {pid} outlived its parent by {within} s"
        time.sleep(0.05)


POOL_SCRIPT = textwrap.dedent('''
    import asyncio, sys
    from pathlib import Path
    from node.process_pool import ProcessPool
    from protocol.messages.tasks import Resources, pack_value, unpack_value

    async def main():
        pool = ProcessPool(slots=1)
        print(type(asyncio.get_running_loop()).__module__, flush=True)
        def show(outcome):
            print(unpack_value(outcome.value), flush=True)
        await pool.run(attempt=1, function="job:pid_or_nap", bundle_path=Path(sys.argv[1]),
                       items=[(0, pack_value("pid")), (1, pack_value(600))], timeout_s=900,
                       resources=Resources(), on_outcome=show)

    if sys.argv[2] == "uvloop":
        import uvloop
        uvloop.run(main())
    else:
        asyncio.run(main())
''')


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_kill_9_of_the_node_takes_its_workers(job: Path, loop: str) -> None:
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    script = subprocess.Popen([sys.executable, "-c", POOL_SCRIPT, str(job), loop], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert script.stdout is not None
        assert script.stdout.readline().startswith(loop)
        line = script.stdout.readline()
        assert line, "the script failed before its worker answered"
        child = int(line)
        assert not _gone(child)
    finally:
        script.kill()
        script.wait()
    _wait_gone(child, 5.0)


DIRECT_SCRIPT = textwrap.dedent('''
    import os, subprocess, sys, time
    from node.tasks import worker_frames as frames
    from protocol.messages.tasks import pack_value

    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    worker = subprocess.Popen(
        [sys.executable, "-P", "-m", "node.tasks.task_worker", "--request-fd", str(req_r),
         "--reply-fd", str(rep_w), "--parent-pid", str(os.getpid()),
         "--allow", "node.tasks.builtins"], pass_fds=(req_r, rep_w), **quiet)
    # Another process holds the request pipe open: no EOF when this one dies.
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                              pass_fds=(req_w,), **quiet)
    try:
        os.write(req_w, frames.encode_frame(frames.run_request(
            attempt=1, function="node.tasks.builtins:double", path=None,
            items=[(0, pack_value(2))])))
        size = frames.frame_length(os.read(rep_r, 4))
        reply = frames.decode_body(os.read(rep_r, size))
        assert reply["ok"] and reply["value"] == pack_value(4), reply
        print(worker.pid, holder.pid, flush=True)
        if sys.argv[1] == "eof":
            holder.kill()
            holder.wait()
            os.close(req_w)
            print(worker.wait(timeout=10), flush=True)
        else:
            time.sleep(120)
    except BaseException:
        holder.kill()
        worker.kill()
        raise
''')


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_pdeathsig_alone_kills_the_worker() -> None:
    script = subprocess.Popen([sys.executable, "-c", DIRECT_SCRIPT, "pdeathsig"], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    holder = 0
    try:
        assert script.stdout is not None
        line = script.stdout.readline()
        assert line, "the script failed before its worker answered"
        worker, holder = map(int, line.split())
        script.kill()
        script.wait()
        _wait_gone(worker, 5.0)
        assert not _gone(holder)  # so the request pipe never reached EOF
    finally:
        script.kill()
        if holder:
            os.kill(holder, signal.SIGKILL)


def test_eof_on_the_request_pipe_ends_the_worker() -> None:
    out = subprocess.run([sys.executable, "-c", DIRECT_SCRIPT, "eof"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "0"  # it exited, cleanly, on its own
