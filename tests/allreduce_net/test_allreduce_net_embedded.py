"""``MeshNode`` (numpy entry point), ``MeshGradientAverager`` and the DDP comm hook, with two
real nodes on loopback in this process (each on its own thread and event loop)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from node.allreduce import layout
from node.allreduce.rounds import MAX_PENDING_ROUNDS
from node.config import NodeConfig, parse_address
from node.embedded import MeshNode
from node.identity import create_mesh_key
from node.torch_hooks import MeshGradientAverager, MeshHookState, mesh_allreduce_hook
from protocol.connection import Channel
from protocol.errors import ConfigError, TimeoutError
from protocol.messages.tensor import ArBegin, ArPart, DropReason
from protocol.tensor import CodecId, CodecSpec, TensorChunk, encode_chunk
from simulations.allreduce_procs import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def meshes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MeshNode, MeshNode, list[bytes]]]:
    root: Path = tmp_path_factory.mktemp("mesh")
    key = root / "mesh.key"
    create_mesh_key(key)

    def config(i: int, seeds: tuple[str, ...] = ()) -> NodeConfig:
        return NodeConfig(listen=parse_address("127.0.0.1:0"), data_dir=root / f"n{i}", mesh_key_file=key,
                          preset="local", seeds=tuple(parse_address(s) for s in seeds), log_level="WARNING")

    with MeshNode(config(0)) as a, MeshNode(config(1, (a.address,))) as b:
        group = a.wait_for_members(2, timeout=30)
        assert b.wait_for_members(2, timeout=30) == group == sorted([a.node_id, b.node_id])
        yield a, b, group


def _both(fa: Callable[[], Any], fb: Callable[[], Any]) -> tuple[Any, Any]:
    """Run two blocking calls at once (a round needs both members)."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        x, y = pool.submit(fa), pool.submit(fb)
        return x.result(60), y.result(60)


def test_numpy_in_numpy_out(meshes: tuple[MeshNode, MeshNode, list[bytes]]) -> None:
    a, b, group = meshes
    x = np.arange(24, dtype=np.float64).reshape(4, 6)
    y = -3 * x
    hexes = [g.hex() for g in group]  # hex strings are accepted too
    oa, ob = _both(lambda: a.all_reduce(x, group=group), lambda: b.all_reduce(y, group=hexes))
    expected = (x + y) / 2
    for out in (oa, ob):
        assert isinstance(out.tensor, np.ndarray) and out.tensor.dtype == np.float64
        np.testing.assert_array_equal(out.tensor, expected)
        assert out.contributors == tuple(group) and out.dropped == {} and out.contributed
    assert oa.round_id == ob.round_id


def test_in_place_and_lossy_codec(meshes: tuple[MeshNode, MeshNode, list[bytes]]) -> None:
    a, b, group = meshes
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal(50_000, dtype=np.float32), rng.standard_normal(50_000, dtype=np.float32)
    exact = (x.astype(np.float64) + y) / 2
    xa, yb = x.copy(), y.copy()
    oa, _ = _both(lambda: a.all_reduce(xa, group=group, codec="int8", in_place=True, key="inplace"),
                  lambda: b.all_reduce(yb, group=group, codec="int8", in_place=True, key="inplace"))
    assert oa.tensor is xa
    bound = 2 * max(np.abs(x).max(), np.abs(y).max()) / 254 + 1e-6
    assert np.abs(xa - exact).max() <= bound and np.abs(yb - exact).max() <= bound
    np.testing.assert_array_equal(xa, yb)  # both members hold the same (decoded) average


def test_torch_tensor_in_torch_out(meshes: tuple[MeshNode, MeshNode, list[bytes]]) -> None:
    a, b, group = meshes
    x = torch.arange(10, dtype=torch.float32).reshape(2, 5)
    oa, ob = _both(lambda: a.all_reduce(x, group=group, key="t"),
                   lambda: b.all_reduce(x + 2, group=group, key="t"))
    assert isinstance(oa.tensor, torch.Tensor) and oa.tensor.shape == (2, 5)
    assert torch.equal(oa.tensor, x + 1) and torch.equal(ob.tensor, x + 1)


def test_silent_member_timeout_and_dead_member(meshes: tuple[MeshNode, MeshNode, list[bytes]]) -> None:
    a, _, group = meshes
    x = np.ones(10, np.float32)
    # b is alive but never calls: the deadline passes before its join timeout -> typed timeout
    with pytest.raises(TimeoutError):
        a.all_reduce(x, group=group, timeout=0.5, key="b-is-silent")
    # a member that is not alive is dropped at once (DIED); the survivors' mean is a's own
    ghost = bytes(32)
    out = a.all_reduce(x, group=[a.node_id, ghost], timeout=30, key="ghost", min_contributors=1)
    assert out.contributors == (a.node_id,) and out.dropped == {ghost: DropReason.DIED}
    np.testing.assert_array_equal(out.tensor, x)
    with pytest.raises(ConfigError):
        a.all_reduce(x, group=group, codec="no-such-codec", key="bad")
    with pytest.raises(ConfigError):
        a.all_reduce(np.arange(3), group=group, key="bad")
    with pytest.raises(ConfigError):
        a.all_reduce(x, group=[ghost], key="bad")  # this node is not in the group
    with pytest.raises(ConfigError):
        a.all_reduce(x, group=[a.node_id, ghost], timeout=30, key="ghost")  # a key is used once


def test_late_member_and_bounded_pending_inbox(meshes: tuple[MeshNode, MeshNode, list[bytes]]) -> None:
    a, b, group = meshes
    x, y = np.full(1000, 2.0, np.float32), np.zeros(1000, np.float32)
    # a starts first; b's call comes later: b holds a's AR_BEGIN until then, then catches up
    late = threading.Timer(0.5, lambda: None)
    late.start()

    def b_late() -> Any:
        late.join()
        return b.all_reduce(y, group=group, key="late")

    oa, ob = _both(lambda: a.all_reduce(x, group=group, key="late"), b_late)
    assert oa.contributors == ob.contributors == tuple(group)
    np.testing.assert_array_equal(ob.tensor, np.full(1000, 1.0, np.float32))
    # rounds b never joins: b holds the newest MAX_PENDING_ROUNDS of them, forgets older ones
    # (so the rounds of the next tests, which b does join, still find their AR_BEGIN)
    futures = [a.all_reduce_future(x, group=group, key=f"never:{i}", timeout=0.5)
               for i in range(MAX_PENDING_ROUNDS + 8)]
    for f in futures:
        with pytest.raises(TimeoutError):
            f.result(30)

    async def pending() -> int:
        return b.node.allreduce.pending_rounds

    assert b.submit(pending()).result() == MAX_PENDING_ROUNDS


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


def _local_grads(model: nn.Module, data: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    model(data).pow(2).mean().backward()
    return [p.grad.clone() for p in model.parameters()]


def test_gradient_averager(meshes: tuple[MeshNode, MeshNode, list[bytes]]) -> None:
    a, b, group = meshes
    models = [_model(1), _model(1)]
    data = [torch.randn(4, 8, generator=torch.Generator().manual_seed(s)) for s in (10, 11)]
    local = [_local_grads(m, d) for m, d in zip(models, data, strict=True)]
    averagers = [MeshGradientAverager(m.parameters(), mesh, group=group)
                 for m, mesh in zip(models, (a, b), strict=True)]
    _both(averagers[0].step, averagers[1].step)
    for m in models:
        for p, ga, gb in zip(m.parameters(), *local, strict=True):
            torch.testing.assert_close(p.grad, (ga + gb) / 2, rtol=1e-6, atol=1e-7)
    assert averagers[0].last is not None and averagers[0].last.contributors == tuple(group)


def test_ddp_comm_hook(meshes: tuple[MeshNode, MeshNode, list[bytes]]) -> None:
    a, b, group = meshes
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        nets = [_model(2), _model(2)]
        data = [torch.randn(4, 8, generator=torch.Generator().manual_seed(s)) for s in (20, 21)]
        local = [_local_grads(m, d) for m, d in zip(nets, data, strict=True)]
        ddps = [nn.parallel.DistributedDataParallel(m) for m in nets]
        states = [MeshHookState(mesh, group) for mesh in (a, b)]
        for ddp, state in zip(ddps, states, strict=True):
            ddp.register_comm_hook(state, mesh_allreduce_hook)
        barrier = threading.Barrier(2)

        def backward(i: int) -> None:
            ddps[i].zero_grad()
            barrier.wait()
            ddps[i](data[i]).pow(2).mean().backward()

        for _ in range(2):  # two iterations: round keys advance with the iteration
            _both(lambda: backward(0), lambda: backward(1))
        for net in nets:
            for p, ga, gb in zip(net.parameters(), *local, strict=True):
                torch.testing.assert_close(p.grad, (ga + gb) / 2, rtol=1e-6, atol=1e-7)
        assert states[0].iteration == 2 and states[0].outcomes
        assert all(o.contributors == tuple(group) for o in states[0].outcomes.values())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("bad", ["no such slice", "undecodable"])
def test_member_breaking_the_protocol_is_dropped_and_disconnected(
        meshes: tuple[MeshNode, MeshNode, list[bytes]], bad: str) -> None:
    """b plays a hostile member by hand: a valid AR_BEGIN, then a chunk for a slice that does
    not exist, or one whose zstd frame is garbage. a drops b (PROTOCOL_ERROR), closes its
    links, and returns its own mean."""
    a, b, group = meshes
    x = np.ones(64, np.float32)
    key = f"hostile {bad}"
    rid = layout.round_id(group, key.encode())
    sizes = layout.slice_sizes(x.size, [1.0, 1.0])
    digest = layout.layout_digest(x.size, sizes, CodecSpec.parse("none").chunk_elements, "none")
    started = a.all_reduce_future(x, group=group, key=key, timeout=30, min_contributors=1)

    async def round_started() -> None:  # data for a round not started here yet is dropped
        while not a.node.allreduce.has_round(rid):
            await asyncio.sleep(0.005)

    a.submit(asyncio.wait_for(round_started(), 10)).result(15)

    async def misbehave() -> None:
        node = b.node
        await node.send(a.node_id, ArBegin(round_id=rid, numel=x.size, layout=digest),
                        channel=Channel.CONTROL)
        if bad == "no such slice":
            part = ArPart(round_id=rid, slice=7, chunk=0, data=encode_chunk(x[:32], CodecSpec.parse("none")))
        else:
            garbage = TensorChunk(stages=(CodecId.NONE, CodecId.ZSTD), numel=32, kept=32, raw_bytes=128,
                                  payload=b"\x28\xb5\x2f\xfd" + bytes(20))
            part = ArPart(round_id=rid, slice=0, chunk=0, data=garbage)
        await node.send(a.node_id, part)

    b.submit(misbehave()).result(10)
    out = started.result(30)
    assert out.contributors == (a.node_id,)
    assert out.dropped == {b.node_id: DropReason.PROTOCOL_ERROR}
