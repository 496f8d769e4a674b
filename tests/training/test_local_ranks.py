"""A worker's local ranks (``node.training.runner.local_ranks``) inside ``seat.Session``.

Two gloo CPU ranks: this test process is local rank 0 (as a job's training process is) and
``GradientRanks`` spawns rank 1, a gradient helper with its own char GPT. The same seat (the
same reads, the tiny char GPT) runs in a session without helpers (G=1) and in one with them
(G=2); the fake exchange records what it is given and halves it (a second host with a zero
gradient), so the step that follows is the exchange's result, not the host's mean.

Numerics (local_ranks' docstring): every per-batch gradient is the same computation; only the
summation order differs. With 2 or 3 reads a step (slices [1, 1] or [2, 1]) the association is
the same (g1+g2, (g1+g2)+g3) and the parameters are bit-identical; with 4 reads ((g1+g2)+(g3+g4)
against ((g1+g2)+g3)+g4) the first step's host mean differs by float32 rounding (observed on
this 2-core machine: max |Δ| 7e-9), which 8 AdamW steps at lr 1e-2 carry to max |Δ| 9e-6 in the
parameters in sync mode and 1e-6 in DiLoCo (asserted: 1e-4; after 40 sync steps it is 3e-3, the
rounding growing through AdamW as between any two summation orders); losses agree within
3e-7. With one read a step (rank 1 idle, adding exact zeros) it is bit-identical again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from node.training.runner import charlm
from node.training.runner.local_ranks import GradientRanks, JobRecipe, rank_devices, split_reads
from node.training.runner.seat import SeatError, Session, SessionConfig
from protocol.errors import ConfigError
from protocol.messages.training import Seat, SeatReport, ShardCursor
from tests.training import test_train_worker as tw

TINY = tw.TINY
BUILTIN = "node.training.runner.charlm:make_job"
ALLOW = ("node.training.runner.*",)
CPU2 = [torch.device("cpu")] * 2
#: Seconds a collective of the failure test's ranks waits (a hung helper costs this much).
TIMEOUT = 5.0
#: Largest parameter difference allowed after 8 steps with 4 reads a step (module docstring).
PARAM_ATOL = 1e-4


class Recorder:
    """The node's exchange, faked: records (step, examples, buffer), halves the buffer."""

    def __init__(self, on_call: Any = None) -> None:
        self.calls: list[tuple[int, float, torch.Tensor]] = []
        self.on_call = on_call

    def __call__(self, step: int, buffer: torch.Tensor, examples: float) -> tuple[int, int]:
        self.calls.append((step, examples, buffer.clone()))
        if self.on_call is not None:
            self.on_call(step)
        buffer.mul_(0.5)
        return 1, 4 * buffer.numel()


def seat(start: int, end: int, share: int, *, position: int = 0, order: tuple[int, ...] = tuple(range(8))) -> Seat:
    return Seat(job=b"j" * 16, epoch=1, segment=0, plan=1, start=start, end=end, group=(b"\x01" * 32,),
                rank=0, cursors=tuple(ShardCursor(shard=k, position=position) for k in order), shares=(share,))


def run(session: Session, s: Seat, exchange: Recorder | None = None) -> tuple[SeatReport, Recorder, torch.Tensor]:
    exchange = exchange or Recorder()
    report = session.run_seat(s, exchange=exchange, put=lambda path, what, copies: b"\x00" * 32,
                              progress=lambda step, loss, tokens_s: None)
    flat = torch.cat([p.detach().reshape(-1) for p in session.model.parameters()])
    return report, exchange, flat


@pytest.fixture
def work(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def helpers() -> Iterator[GradientRanks]:
    shapes = [tuple(p.shape) for p in charlm.make_job(TINY).model.parameters()]
    ranks = GradientRanks(JobRecipe(BUILTIN, None, TINY, ALLOW), devices=CPU2, shapes=shapes, threads=1,
                          timeout=60.0, start_timeout=60.0)
    yield ranks
    ranks.close()


def sessions(work: Path, mode: str, helpers: GradientRanks) -> tuple[Session, Session]:
    one = Session(lambda: charlm.make_job(TINY), SessionConfig(work=work, mode=mode))
    two = Session(lambda: charlm.make_job(TINY), SessionConfig(work=work, mode=mode))
    two.helpers = helpers
    return one, two


# ------------------------------------------------------------------------------ pure parts


@pytest.mark.parametrize(("n", "world", "sizes"), [(4, 2, [2, 2]), (3, 2, [2, 1]), (1, 2, [1, 0]),
                                                   (0, 2, [0, 0]), (7, 3, [3, 2, 2]), (2, 4, [1, 1, 0, 0])])
def test_split_reads_is_contiguous_and_even(n: int, world: int, sizes: list[int]) -> None:
    reads = [(k % 3, k) for k in range(n)]
    slices = split_reads(reads, world)
    assert [len(s) for s in slices] == sizes
    assert [c for s in slices for c in s] == reads


def test_rank_devices_on_a_cpu_host() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CPU host's table")
    cpu = torch.device("cpu")
    assert rank_devices(0) == [cpu] and rank_devices(None) == [cpu]
    assert rank_devices(0, 2) == [cpu, cpu] and rank_devices(None, 3) == [cpu] * 3
    with pytest.raises(ConfigError, match="1 GPUs per worker; this host has 0"):
        rank_devices(1, 1)
    with pytest.raises(ConfigError, match="local ranks: -1"):
        rank_devices(0, -1)


# ------------------------------------------------------------------------------ one vs two ranks


def test_two_local_ranks_train_as_one_device(work: Path, helpers: GradientRanks) -> None:
    # sync, 4 reads a step: 2 on each rank, the same mean to float32 summation order
    one, two = sessions(work, "sync", helpers)
    r1, x1, p1 = run(one, seat(0, 8, 4))
    r2, x2, p2 = run(two, seat(0, 8, 4))
    assert [(s, e) for s, e, _ in x2.calls] == [(s, 4.0) for s in range(8)]  # once a step, on rank 0
    assert [(s, e) for s, e, _ in x1.calls] == [(s, e) for s, e, _ in x2.calls]
    assert helpers.dealt == [16, 16]  # rank 1 computed half of the reads
    first = (x1.calls[0][2] - x2.calls[0][2]).abs().max().item()
    assert 0 < first <= 1e-6 * x1.calls[0][2].abs().max().item()  # the same θ: rounding only
    drift = (p1 - p2).abs().max().item()
    assert drift <= PARAM_ATOL and not torch.equal(p1, p2), drift
    assert r2.cursors == r1.cursors and r2.tokens == r1.tokens and r2.rounds == 8
    assert max(abs(a - b) for a, b in zip(r1.losses, r2.losses, strict=True)) < 1e-5

    # 3 reads (slices of 2 and 1: the same association) and 1 read (rank 1 idle): bit-identical
    for share in (3, 1):
        dealt = list(helpers.dealt)
        _, x1, p1 = run(one, seat(0, 4, share))  # from the seed again (state None)
        _, x2, p2 = run(two, seat(0, 4, share))
        assert torch.equal(p1, p2), share
        assert all(torch.equal(a[2], b[2]) for a, b in zip(x1.calls, x2.calls, strict=True))
        assert helpers.dealt[1] - dealt[1] == (4 if share == 3 else 0)

    # DiLoCo: the inner steps' gradients through the helper, rank 0's AdamW, one exchange
    one, two = sessions(work, "diloco", helpers)
    _, x1, p1 = run(one, seat(0, 8, 4))
    _, x2, p2 = run(two, seat(0, 8, 4))
    assert [(s, e) for s, e, _ in x2.calls] == [(7, 32.0)]
    drift = (p1 - p2).abs().max().item()
    assert drift <= PARAM_ATOL, drift
    assert helpers.spawned == 1 and helpers.usable()


# ------------------------------------------------------------------------------ failures


def test_a_helper_that_raises_or_dies_fails_the_seat(work: Path) -> None:
    bundle = work / "bundle"
    bundle.mkdir()
    (bundle / "flakyjob.py").write_text(textwrap.dedent(tw.BUNDLE))  # its flaky job
    recipe = JobRecipe("flakyjob:flaky", str(bundle), TINY | {"raise_at": "1:0", "hang_at": "3:9"}, ALLOW)
    session = Session(recipe.build, SessionConfig(work=work))
    session.helpers = helpers = GradientRanks(recipe, devices=CPU2, shapes=session.shapes, threads=1,
                                              timeout=TIMEOUT, start_timeout=60.0)
    try:
        # step 0 reads (0, 0) on rank 0 and (1, 0) on rank 1: rank 1's job code raises
        with pytest.raises(SeatError) as raised:
            run(session, seat(0, 4, 2))
        assert raised.value.kind == "ValueError"
        assert str(raised.value) == "local rank 1: ValueError: raised at 1:0"
        assert helpers.usable() and helpers.spawned == 1  # the group lives on
        # rank 0's own raise is the job's exception, after the all-reduce: still usable
        with pytest.raises(ValueError, match="raised at 1:0"):
            run(session, seat(0, 4, 2, order=(1, 0, *range(2, 8))))
        assert helpers.usable()

        # rank 1 killed after step 1's exchange: step 2 fails at once, naming it
        (pid,) = helpers.pids
        killed: list[float] = []

        def kill(step: int) -> None:
            if step == 1:
                os.kill(pid, signal.SIGKILL)
                killed.append(time.monotonic())

        with pytest.raises(SeatError) as died:
            run(session, seat(0, 6, 2, position=5), Recorder(kill))
        assert time.monotonic() - killed[0] < TIMEOUT - 1  # a closed connection, not the timeout
        assert died.value.kind == "LocalRankFailed"
        assert "step 2" in str(died.value) and "local rank 1 exited with code -9" in str(died.value), died.value
        assert not helpers.usable()

        # the next seat spawns the helpers afresh and trains
        report, exchange, _ = run(session, seat(0, 3, 2, position=5))
        assert helpers.spawned == 2 and helpers.usable() and helpers.pids != [pid]
        assert len(report.losses) == 3 and [s for s, _, _ in exchange.calls] == [0, 1, 2]

        # rank 1 hangs in the job's loss at step 1 (it reads (3, 9)): the timeout fails the seat
        began = time.monotonic()
        with pytest.raises(SeatError) as stuck:
            run(session, seat(0, 4, 2, position=9))
        assert TIMEOUT - 0.5 < time.monotonic() - began < TIMEOUT + 10
        assert stuck.value.kind == "LocalRankFailed" and "all-reduce of the gradients of step 1" in str(stuck.value)
        assert f"timeout ({TIMEOUT:g} s)" in str(stuck.value), stuck.value
        hung = helpers.pids
    finally:
        helpers.close()
    assert helpers.pids == []
    tw_wait_gone(hung)  # killed at once: its group had failed


def test_a_helper_that_builds_another_model_fails_to_start() -> None:
    shapes = [tuple(p.shape) for p in charlm.make_job(TINY).model.parameters()]
    wider = TINY | {"n_embd": "48", "n_head": "2"}
    with pytest.raises(Exception, match="local rank 1 built another model"):
        GradientRanks(JobRecipe(BUILTIN, None, wider, ALLOW), devices=CPU2, shapes=shapes, threads=1,
                      timeout=30.0, start_timeout=60.0)


# ------------------------------------------------------------------------------ the training process


def children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid`` (from /proc; zombies left out)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
                out.append(int(entry.name))
    return out


def test_a_training_process_with_two_local_ranks(tmp_path: Path) -> None:
    """``train_worker`` opened with ``local_ranks`` 2 on split CPUs trains a seat of 3 reads a
    step to the same state bytes as a one-rank process, and closes with its helper gone."""
    procs = [tw_start(tmp_path, n) for n in range(2)]
    try:
        one, two = procs
        cpus = sorted(os.sched_getaffinity(0))
        numel = tw.opened(one, options=TINY)
        assert tw.opened(two, options=TINY, local_ranks=2, cpus=cpus) == numel
        helpers = [c for c in children(two.popen.pid) if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
        assert len(helpers) == 1 and children(one.popen.pid) == []
        reports = []
        for proc in procs:
            (report,) = tw.Node().run([(proc, seat(0, 4, 3, position=2), None)])
            assert isinstance(report, SeatReport), report
            reports.append(report)
        assert reports[0].state == reports[1].state  # bit-identical parameters and AdamW moments
        assert reports[0].losses == pytest.approx(reports[1].losses, rel=1e-6)  # float32-summed
        tw.close(one, two)
        tw_wait_gone(helpers)
    finally:
        for proc in procs:
            if proc.popen.poll() is None:
                proc.popen.kill()
            proc.popen.wait()
            os.close(proc.requests)
            os.close(proc.replies)


def tw_start(tmp_path: Path, n: int) -> tw.Proc:
    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    work = tmp_path / f"work{n}"
    work.mkdir()
    log = tmp_path / f"proc{n}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            [sys.executable, "-P", "-m", "node.training.train_worker", "--requests", str(req_r),
             "--replies", str(rep_w), "--parent-pid", str(os.getpid())],
            pass_fds=(req_r, rep_w), cwd=tw.ROOT, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    os.close(req_r)
    os.close(rep_w)
    return tw.Proc(popen, req_w, rep_r, work, log)


def tw_wait_gone(pids: list[int], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while [p for p in pids if _running(p)]:
        assert time.monotonic() < deadline, f"helpers {pids} outlived their training process"
        time.sleep(0.05)


def _running(pid: int) -> bool:
    """``pid`` runs (a zombie nobody reaped yet has exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")
