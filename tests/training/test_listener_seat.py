"""A newcomer's listener seat (``seat.Session._listen``) against incumbents, in one process.

Three sessions of the tiny char GPT run their seats in threads; their exchange is a faithful
stand-in for the node's (``node.training.service``): each part is scaled by its rank's share,
summed over the group and divided by the total share, so the listener adds nothing. Segment 1:
ranks A and B train from the seed and store the state. Segment 2: A and B go on from memory
with shares 2 and 1; C listens with share 0, and its state "arrives" only after some rounds
(the download): it must replay the means it kept and end with state bytes identical to A's and
B's, in sync and in DiLoCo, whenever the state arrives (first round, mid-segment, at the end).
"""

from __future__ import annotations

import hashlib
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from node.training.runner import charlm
from node.training.runner.seat import Session, SessionConfig
from protocol.messages.training import Seat, SeatReport, ShardCursor
from tests.training import test_train_worker as tw

TINY = tw.TINY
A, B, C = b"\x0a" * 32, b"\x0b" * 32, b"\x0c" * 32


class Group:
    """The node's share-weighted all-reduce over the sessions of one segment (threads)."""

    def __init__(self, shares: tuple[int, ...]) -> None:
        self.shares = shares
        self.parts: dict[int, torch.Tensor] = {}
        self.barrier = threading.Barrier(len(shares))
        self.lock = threading.Lock()
        self.mean: torch.Tensor | None = None

    def exchange(self, rank: int) -> Callable[[int, torch.Tensor, float], tuple[int, int]]:
        def call(step: int, buffer: torch.Tensor, examples: float) -> tuple[int, int]:
            with self.lock:
                self.parts[rank] = buffer * float(self.shares[rank])
            if self.barrier.wait() == 0:
                self.mean = sum(self.parts.values(), torch.zeros_like(buffer)) / float(sum(self.shares))
            self.barrier.wait()
            assert self.mean is not None
            buffer.copy_(self.mean)
            self.barrier.wait()
            return sum(1 for s in self.shares if s > 0), 0
        return call


class Blobs:
    """put(): the file becomes a blob, its id its sha256; path(): where a blob lies."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def put(self, path: Path, what: str, copies: int) -> bytes:
        digest = hashlib.sha256(path.read_bytes()).digest()
        shutil.copyfile(path, self.root / digest.hex())
        return digest

    def path(self, digest: bytes) -> str:
        return str(self.root / digest.hex())


def seat(rank: int, group: tuple[bytes, ...], shares: tuple[int, ...], start: int, end: int,
         state: bytes | None, cursors: tuple[ShardCursor, ...]) -> Seat:
    return Seat(job=b"j" * 16, epoch=1, segment=start // 4, plan=1 + start // 4, start=start, end=end, group=group,
                rank=rank, state=state, cursors=cursors, shares=shares)


def run_all(runs: list[Callable[[], SeatReport]]) -> list[SeatReport]:
    out: list[SeatReport | BaseException | None] = [None] * len(runs)

    def go(i: int) -> None:
        try:
            out[i] = runs[i]()
        except BaseException as exc:  # surfaced below, with the others' results
            out[i] = exc
    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(runs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for r in out:
        if isinstance(r, BaseException):
            raise r
    assert all(isinstance(r, SeatReport) for r in out), out
    return [r for r in out if isinstance(r, SeatReport)]


@pytest.mark.parametrize("mode", ["sync", "diloco"])
@pytest.mark.parametrize("arrives_after", [0, 2, 99])
def test_a_listener_replays_to_the_incumbents_state_bit_for_bit(tmp_path: Path, mode: str, arrives_after: int) -> None:
    torch.set_num_threads(1)
    blobs = Blobs(tmp_path / "blobs")
    sessions = [Session(lambda: charlm.make_job(TINY), SessionConfig(work=tmp_path / f"w{i}", mode=mode))
                for i in range(3)]
    for i in range(3):
        (tmp_path / f"w{i}").mkdir()
    noop = lambda step, loss, tokens_s: None  # noqa: E731

    # segment 1: A and B from the seed, shards 0,2,4,6 and 1,3,5,7
    g1 = Group((1, 1))
    first = run_all([
        lambda r=r: sessions[r].run_seat(
            seat(r, (A, B), (1, 1), 0, 4, None, tuple(ShardCursor(shard=k, position=0) for k in range(r, 8, 2))),
            exchange=g1.exchange(r), put=blobs.put, progress=noop)
        for r in (0, 1)])
    state = first[0].state
    assert first[1].state == state

    # segment 2: A (share 2) and B (share 1) go on; C listens, its download lands late
    shares = (2, 1, 0)
    g2 = Group(shares)
    asked = {"n": 0}

    def arrived(wait: bool) -> str | None:
        asked["n"] += 1
        return blobs.path(state) if wait or asked["n"] > arrives_after else None

    cursors = [tuple(ShardCursor(shard=k, position=4) for k in range(r, 8, 2)) for r in (0, 1)]
    second = run_all([
        lambda: sessions[0].run_seat(seat(0, (A, B, C), shares, 4, 8, state, cursors[0]),
                                     exchange=g2.exchange(0), put=blobs.put, progress=noop),
        lambda: sessions[1].run_seat(seat(1, (A, B, C), shares, 4, 8, state, cursors[1]),
                                     exchange=g2.exchange(1), put=blobs.put, progress=noop),
        lambda: sessions[2].run_seat(seat(2, (A, B, C), shares, 4, 8, state, ()),
                                     exchange=g2.exchange(2), put=blobs.put, progress=noop, arrived=arrived),
    ])
    assert second[0].state == second[1].state == second[2].state  # the listener caught up exactly
    assert second[2].cursors == () and second[2].losses == (0.0,) * 4 and second[2].tokens == 0
    assert second[2].rounds == (4 if mode == "sync" else 1)
    # and it did train: A's micro-batches per step are 2, B's 1 (positions moved by share)
    assert {c.position for c in second[0].cursors} == {4 + 4 * 2 // 4}
    assert sum(c.position - 4 for c in second[1].cursors) == 4
    assert second[0].state != state
