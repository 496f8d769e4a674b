"""Real training processes (``node.training.train_worker``) with the test playing their node.

The test creates each process's shared buffer file, answers every ``exchange`` by averaging
the buffers of the seat's processes in lockstep (non-finite contributions left out, as the
all-reduce does), answers every ``put`` by taking the file into a dict keyed by its sha256 (the
32-byte id), and checks every frame it receives with ``seat_frames.parse_from_process``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import select
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import torch

from node.tasks import worker_frames as frames
from node.training import seat_frames as sf
from node.training.runner import charlm, export, reference, state
from node.training.runner.seat import NONFINITE_LOSS, clip_coefficient, reportable
from protocol.messages.tasks import decode_struct, encode_struct
from protocol.messages.training import Seat, SeatReport, ShardCursor

ROOT = Path(__file__).resolve().parents[2]
#: Seconds any one frame may take to come (a hung process fails the test, never hangs it).
FRAME_TIMEOUT_S = 120.0
JOB = b"j" * 16
NODES = (b"\x01" * 32, b"\x02" * 32)
TINY = {"n_layer": "1", "n_head": "2", "n_embd": "32", "block_size": "32", "batch_size": "4",
        "eval_batches": "2", "sample_chars": "20", "shards": "8", "lr": "1e-2", "seed": "7"}

BUNDLE = '''
import time

from node.training.runner import charlm


def boom(options):
    raise RuntimeError("boom from make_job")


def flaky(options):
    """charlm, whose loss is NaN at the batch ``nan_at``, raises at ``raise_at`` and hangs at ``hang_at``."""
    options = dict(options)
    nan_at, raise_at = options.pop("nan_at", ""), options.pop("raise_at", "")
    hang_at = options.pop("hang_at", "")
    job = charlm.make_job(options)
    batch, loss, last = job.batch, job.loss, [""]

    def read(shard, position):
        last[0] = f"{shard}:{position}"
        return batch(shard, position)

    def measure(model, b):
        if last[0] == raise_at:
            raise ValueError(f"raised at {raise_at}")
        if last[0] == hang_at:
            time.sleep(600)
        value = loss(model, b)
        return value * float("nan") if last[0] == nan_at else value

    job.batch, job.loss = read, measure
    return job
'''


@dataclass
class Proc:
    """One training process and its pipes, as its node sees it."""

    popen: subprocess.Popen[bytes]
    requests: int
    replies: int
    work: Path
    log: Path
    buffer: np.ndarray[Any, Any] | None = None
    pending: bytes = b""
    received: list[sf.FromProcess] = field(default_factory=list)

    def send(self, obj: dict[str, Any]) -> None:
        os.write(self.requests, frames.encode_frame(obj))

    def _read(self, n: int) -> bytes:
        deadline = time.monotonic() + FRAME_TIMEOUT_S
        while len(self.pending) < n:
            ready, _, _ = select.select([self.replies], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(self.replies, 1 << 20) if ready else b""
            if not chunk:
                raise AssertionError(f"no frame (exit {self.popen.poll()}): {self.log.read_text()[-3000:]}")
            self.pending += chunk
        out, self.pending = self.pending[:n], self.pending[n:]
        return out

    def recv(self) -> sf.FromProcess:
        size = frames.frame_length(self._read(frames.HEADER_BYTES))
        parsed = sf.parse_from_process(frames.decode_body(self._read(size)))
        self.received.append(parsed)
        return parsed

    def open(self, function: str = "node.training.runner.charlm:make_job", *,
             path: str | None = None, options: dict[str, str] | None = None, mode: str = "sync",
             prune: float = 0.0, quantize: str = "none", **extra: Any) -> sf.FromProcess:
        self.send({"op": "open", "function": function, "path": path,
                   "options": TINY if options is None else options, "mode": mode,
                   "outer_lr": 0.7, "outer_momentum": 0.9, "threads": 1, "cpus": [],
                   "prune": prune, "quantize": quantize, "work": str(self.work), **extra})
        return self.recv()

    def attach(self, numel: int) -> None:
        path = self.work.parent / f"{self.work.name}.buffer"
        path.write_bytes(bytes(4 * numel))
        self.buffer = np.memmap(path, dtype=np.float32, mode="r+", shape=(numel,))
        self.send({"op": "attach", "path": str(path)})
        assert self.recv() == sf.Attached()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    procs: list[Proc] = []
    shm = Path("/dev/shm")
    base = Path(tempfile.mkdtemp(prefix="starmesh-seat-",
                                 dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path))

    def start() -> Proc:
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        n = len(procs)
        work = base / f"work{n}"
        work.mkdir()
        log = tmp_path / f"proc{n}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                [sys.executable, "-P", "-m", "node.training.train_worker", "--requests", str(req_r),
                 "--replies", str(rep_w), "--parent-pid", str(os.getpid())],
                pass_fds=(req_r, rep_w), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
        os.close(req_r)
        os.close(rep_w)
        proc = Proc(popen, req_w, rep_r, work, log)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.popen.poll() is None:
            proc.popen.kill()
        proc.popen.wait()
        os.close(proc.requests)
        os.close(proc.replies)
    shutil.rmtree(base, ignore_errors=True)


@dataclass
class Node:
    """The test's node: the blob store and the lockstep all-reduce."""

    blobs: dict[bytes, bytes] = field(default_factory=dict)
    puts: list[sf.Put] = field(default_factory=list)
    rounds: list[tuple[int, int]] = field(default_factory=list)
    """``(step, contributors)`` of every round."""

    def file(self, digest: bytes, where: Path) -> str:
        path = where / digest.hex()
        path.write_bytes(self.blobs[digest])
        return str(path)

    def run(self, seats: Sequence[tuple[Proc, Seat, str | None]]) -> list[SeatReport | sf.Failed]:
        """Run one segment's seats to their ends; each one's report or failure."""
        for proc, seat, path in seats:
            proc.send({"op": "seat", "seat": encode_struct(seat), "state": path})
        results: dict[int, SeatReport | sf.Failed] = {}
        while len(results) < len(seats):
            waiting: dict[int, sf.Exchange] = {}
            for i, (proc, _, _) in enumerate(seats):
                if i in results:
                    continue
                got = self._until_blocked(proc)
                if isinstance(got, sf.Exchange):
                    waiting[i] = got
                else:
                    results[i] = got
            if waiting:
                assert len(waiting) + len(results) == len(seats) and not results, "a seat left the rounds"
                self._reduce([seats[i][0] for i in waiting], {e.step for e in waiting.values()})
        return [results[i] for i in range(len(seats))]

    def _until_blocked(self, proc: Proc) -> SeatReport | sf.Failed | sf.Exchange:
        while True:
            frame = proc.recv()
            if isinstance(frame, sf.Put):
                path = Path(frame.path)
                assert path.parent == proc.work
                data = path.read_bytes()
                path.unlink()
                digest = hashlib.sha256(data).digest()
                self.blobs[digest] = data
                self.puts.append(frame)
                proc.send({"op": "stored", "ok": True, "id": digest})
            elif isinstance(frame, sf.Report):
                return decode_struct(SeatReport, frame.report, what="SeatReport")
            elif isinstance(frame, sf.Exchange | sf.Failed):
                return frame
            else:
                assert isinstance(frame, sf.Progress), frame

    def _reduce(self, procs: Sequence[Proc], steps: set[int]) -> None:
        assert len(steps) == 1, f"rounds of different steps {steps}"
        buffers = [p.buffer for p in procs if p.buffer is not None]
        finite = [b for b in buffers if np.isfinite(b).all()]
        mean = np.mean(np.stack(finite), axis=0, dtype=np.float32)
        for proc in procs:
            assert proc.buffer is not None
            proc.buffer[:] = mean
            proc.send({"op": "reduced", "ok": True, "contributors": len(finite),
                       "bytes": mean.nbytes})
        self.rounds.append((steps.pop(), len(finite)))


def seats(start: int, end: int, *, workers: int = 1, positions: dict[int, int] | None = None,
          shards: int = 8, **flags: Any) -> list[Seat]:
    """The coordinator's seats of one segment (shard k to rank k mod W)."""
    group = NODES[:workers]
    return [Seat(job=JOB, epoch=1, segment=0, plan=1, start=start, end=end, group=group, rank=r,
                 cursors=tuple(ShardCursor(shard=k, position=(positions or {}).get(k, 0))
                               for k in range(r, shards, workers)), **flags)
            for r in range(workers)]


def seat_plan(shards: int, start: dict[int, int], steps: int) -> list[tuple[int, int]]:
    """The batches a one-worker seat reads: local step i, shard i % shards, then the next."""
    at = {k: start.get(k, 0) for k in range(shards)}
    out = []
    for i in range(steps):
        out.append((i % shards, at[i % shards]))
        at[i % shards] += 1
    return out


def opened(proc: Proc, **kwargs: Any) -> int:
    got = proc.open(**kwargs)
    assert isinstance(got, sf.Opened), got
    assert got.tokens_per_batch == 4 * 32
    proc.attach(got.numel)
    return got.numel


def positions(report: SeatReport) -> dict[int, int]:
    return {c.shard: c.position for c in report.cursors}


def close(*procs: Proc) -> None:
    for proc in procs:
        proc.send({"op": "close"})
    assert [p.popen.wait(timeout=30) for p in procs] == [0] * len(procs)


# ------------------------------------------------------------------------------- tests


@pytest.mark.parametrize(("value", "want"), [(2.5, 2.5), (-1.0, -1.0), (math.nan, NONFINITE_LOSS),
                                             (math.inf, NONFINITE_LOSS), (-math.inf, -NONFINITE_LOSS)])
def test_reportable_losses_are_finite(value: float, want: float) -> None:
    assert reportable(value) == want


def test_clip_coefficient_is_torchs_formula_in_float64() -> None:
    flat = torch.tensor([3.0, 4.0])
    assert clip_coefficient(flat, 10.0) == 1.0
    assert clip_coefficient(flat, 1.0) == 1.0 / (5.0 + 1e-6)
    assert clip_coefficient(torch.tensor([math.nan]), 1.0) == 1.0


def test_two_workers_in_sync_end_identical_through_a_nan(spawn: Any, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "seatjobs.py").write_text(textwrap.dedent(BUNDLE))
    a, b = spawn(), spawn()
    for proc in (a, b):
        opened(proc, function="seatjobs:flaky", path=str(bundle), options=TINY | {"nan_at": "3:0"})
    node = Node()
    first = node.run([(p, s, None) for p, s in zip((a, b), seats(0, 6, workers=2, checkpoint=True), strict=True)])
    ra, rb = (r for r in first if isinstance(r, SeatReport))
    assert ra.state == rb.state and len(ra.losses) == len(rb.losses) == 6
    assert all(math.isfinite(x) and x < 10 for x in ra.losses)
    # B reads shard 3 at position 0 at its second step: NaN, reported as the sentinel, and left
    # out of that round (A's gradient is the mean), so the parameters still agree.
    assert rb.losses[1] == NONFINITE_LOSS and all(x < 10 for i, x in enumerate(rb.losses) if i != 1)
    assert node.rounds == [(s, 2 if s != 1 else 1) for s in range(6)]
    assert ra.contributors_min == rb.contributors_min == 1 and ra.rounds == 6
    assert positions(ra) == {0: 2, 2: 2, 4: 1, 6: 1} and positions(rb) == {1: 2, 3: 2, 5: 1, 7: 1}
    assert ra.tokens == 6 * 4 * 32 and ra.bytes_sent > 0 and ra.compute_s > 0
    assert [p.copies for p in node.puts] == [2, 2] and all(p.what == "state" for p in node.puts)
    # The next segment continues in memory (no state file given) and agrees again.
    second = seats(6, 10, workers=2, positions=positions(ra) | positions(rb), state=ra.state)
    ra2, rb2 = node.run([(a, second[0], None), (b, second[1], None)])
    assert isinstance(ra2, SeatReport) and isinstance(rb2, SeatReport)
    assert ra2.state == rb2.state != ra.state and node.puts[-1].copies == 0
    close(a, b)


def test_one_worker_matches_the_reference_resumes_bit_exactly_and_exports(
        spawn: Any, tmp_path: Path) -> None:
    s, r = spawn(), spawn()
    options: dict[str, Any] = {"prune": 0.5, "quantize": "int8", "fine_tune_steps": 3}
    opened(s, **options)
    opened(r, **options)
    node = Node()
    (first,) = node.run([(s, seats(0, 10)[0], None)])
    assert isinstance(first, SeatReport)
    final = seats(10, 20, positions=positions(first), state=first.state, final=True, evaluate=True,
                  checkpoint=True)[0]
    (last,) = node.run([(s, final, None)])  # in memory
    assert isinstance(last, SeatReport), last
    # The same seat in another process, from the stored state file: the same end state.
    resumed = replace(final, final=False, evaluate=False)
    (again,) = node.run([(r, resumed, node.file(first.state, tmp_path))])
    assert isinstance(again, SeatReport), again
    assert again.state == last.state and again.losses == last.losses and again.export is None

    losses = [*first.losses, *last.losses]
    plan = seat_plan(8, {}, 10) + seat_plan(8, positions(first), 10)
    want = reference.train_reference(charlm.make_job(TINY), 20, plan=lambda step: [plan[step]]).losses
    assert losses[0] == want[0] and np.allclose(losses, want, rtol=1e-4)
    assert sum(losses[-5:]) / 5 < losses[0] - 0.3  # it learns
    assert last.val_loss is not None and math.isfinite(last.val_loss)

    exported = last.export
    assert exported is not None and exported.model in node.blobs
    tensors, metadata = state.decode(node.blobs[exported.model])
    assert tensors["blocks.0.c_fc.weight"].dtype == torch.int8
    assert json.loads(metadata["config"])["model"] == "charlm"
    assert exported.file_bytes == len(node.blobs[exported.model])
    assert 0 < exported.nonzeros < exported.params and len(exported.sample) == 20
    figures = msgpack.unpackb(exported.report)
    assert figures["quantize"] == export.INT8_METHOD and figures["prune"] == 0.5
    assert figures["after"]["file_bytes"] < figures["before"]["file_bytes"]
    assert [p.what for p in node.puts] == ["state", "state", "model", "state"]
    assert [p.copies for p in node.puts] == [0, 2, 2, 2]
    close(s, r)


def test_diloco_segments_end_identical(spawn: Any) -> None:
    a, b = spawn(), spawn()
    for proc in (a, b):
        opened(proc, mode="diloco")
    node = Node()
    ra, rb = node.run([(p, s, None) for p, s in zip((a, b), seats(0, 5, workers=2), strict=True)])
    assert isinstance(ra, SeatReport) and isinstance(rb, SeatReport)
    assert ra.state == rb.state and ra.rounds == 1 and node.rounds == [(4, 2)]
    assert ra.losses != rb.losses  # their own shards, locally
    tensors, _ = state.decode(node.blobs[ra.state])
    assert float(tensors["outer/momentum"].abs().sum()) > 0 and not any(n.startswith("optim/") for n in tensors)
    second = seats(5, 10, workers=2, positions=positions(ra) | positions(rb), state=ra.state)
    ra2, rb2 = node.run([(a, second[0], None), (b, second[1], None)])
    assert isinstance(ra2, SeatReport) and isinstance(rb2, SeatReport)
    assert ra2.state == rb2.state != ra.state and node.rounds[-1] == (9, 2)
    close(a, b)


def test_failures_are_reported_and_the_process_lives_on(spawn: Any, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "seatjobs.py").write_text(textwrap.dedent(BUNDLE))
    p = spawn()
    node = Node()
    missing = p.open("nosuch:make_job", path=str(bundle))
    assert isinstance(missing, sf.Failed) and missing.failure["type"] == "ModuleNotFoundError"
    refused = p.open("json:loads")  # not a built-in job, no bundle
    assert isinstance(refused, sf.Failed) and refused.failure["type"] == "NotAllowed"
    boom = p.open("seatjobs:boom", path=str(bundle))
    assert isinstance(boom, sf.Failed) and boom.failure["type"] == "RuntimeError"
    assert "boom from make_job" in boom.failure["message"] and "seatjobs.py" in boom.failure["traceback"]
    (not_open,) = node.run([(p, seats(0, 2)[0], None)])
    assert isinstance(not_open, sf.Failed) and not_open.failure["type"] == "NotOpen"

    opened(p, function="seatjobs:flaky", path=str(bundle), options=TINY | {"raise_at": "2:1"})
    (good,) = node.run([(p, seats(0, 4)[0], None)])  # shards 0..3 at position 0
    assert isinstance(good, SeatReport)
    later = {k: 1 for k in range(4)}
    (raised,) = node.run([(p, seats(4, 8, positions=later, state=good.state)[0], None)])
    assert isinstance(raised, sf.Failed) and raised.failure["type"] == "ValueError"  # shard 2 at 1
    assert "raised at 2:1" in raised.failure["message"] and [s for s, _ in node.rounds] == [0, 1, 2, 3, 4, 5]
    # Dirty now: even the state it reported last is not in memory any more...
    (dirty,) = node.run([(p, seats(4, 8, positions=later, state=good.state)[0], None)])
    assert isinstance(dirty, sf.Failed) and dirty.failure["type"] == "StateMissing"
    # ...so it loads the file (other batches than the bad one), or rebuilds from the seed.
    elsewhere = {k: 5 for k in range(8)}
    (loaded,) = node.run([(p, seats(4, 8, positions=elsewhere, state=good.state)[0],
                           node.file(good.state, tmp_path))])
    (seed,) = node.run([(p, seats(0, 2, positions=elsewhere)[0], None)])
    assert isinstance(loaded, SeatReport) and isinstance(seed, SeatReport), (loaded, seed)
    p.send({"op": "bogus"})
    assert p.popen.wait(timeout=30) == 2
    assert "bad frame" in p.log.read_text()
