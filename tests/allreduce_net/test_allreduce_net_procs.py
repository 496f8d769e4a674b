"""Real worker processes on loopback: the mesh's average against gloo's, and a kill -9 mid-round.

Each worker is ``python -m simulations.allreduce_worker node`` (a real ``Node``, encrypted
links); the gloo reference is the same module's ``gloo`` mode (``torch.distributed``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from simulations import allreduce_procs as procs
from simulations.allreduce_worker import load_input
from simulations.netshape import ShapedNet, rate_bytes_per_s, unavailable

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

N = 4
SIZE = 1 << 20


def _inputs(n: int = N) -> list[str]:
    return [f"normal:{100 + i}" for i in range(n)]


def _exact_mean(inputs: list[str], size: int = SIZE) -> np.ndarray:
    """The fp64 mean of the inputs, correctly rounded to fp32 (what ``none`` must return)."""
    acc = np.zeros(size, np.float64)
    for spec in inputs:
        acc += load_input(spec, size)
    return (acc / len(inputs)).astype(np.float32)


def _output(result: dict, codec: str) -> np.ndarray:
    return np.load(result["codecs"][codec]["output"])


def test_four_processes_match_gloo(tmp_path: Path) -> None:
    inputs = _inputs()
    mesh = procs.finish(procs.start_mesh(tmp_path, inputs, size=SIZE, codecs=["none", "int8"], rounds=1,
                                         timeout=60), 150)
    procs.finish(procs.start_gloo(tmp_path, inputs, size=SIZE, rounds=1, timeout=60), 150)
    reference = np.load(tmp_path / "gloo0" / "gloo.npy")
    exact = _exact_mean(inputs)
    xs = np.stack([load_input(s, SIZE) for s in inputs])

    outs = [_output(r, "none") for r in mesh]
    for out in outs:  # every member holds the same, correctly rounded mean
        np.testing.assert_array_equal(out, exact)
    # gloo sums in fp32: it agrees with the exact mean to fp32 rounding of the sum
    ulp = np.spacing(np.abs(xs).sum(axis=0).astype(np.float32)) / N
    assert np.all(np.abs(outs[0] - reference) <= 4 * ulp)

    # int8 (blockwise absmax, 128 per block): each of the two quantizations (contributions,
    # then the average) errs by at most half a step (absmax / 127 / 2) per element
    bound = 2 * np.abs(xs).max() / 254 + 1e-6
    for r in mesh:
        err = np.abs(_output(r, "int8") - exact)
        assert err.max() <= bound
        assert 0 < np.linalg.norm(err) / np.linalg.norm(exact) < 0.02
        # every member returns the same values, its own slices' decoded averages included
        np.testing.assert_array_equal(_output(r, "int8"), _output(mesh[0], "int8"))
    for r in mesh:
        for codec in ("none", "int8"):
            (round_,) = r["codecs"][codec]["rounds"]
            assert len(round_["contributors"]) == N and round_["dropped"] == {}
    # int8 puts about a quarter of fp32's bytes on the wire
    none_bytes = mesh[0]["codecs"]["none"]["rounds"][0]["bulk_sent_bytes"]
    int8_bytes = mesh[0]["codecs"]["int8"]["rounds"][0]["bulk_sent_bytes"]
    assert none_bytes >= 2 * (N - 1) / N * 4 * SIZE
    assert int8_bytes < 0.3 * none_bytes


@pytest.mark.parametrize("failure", ["kill", "stall"])
def test_member_failing_mid_round_survivors_get_exact_mean(tmp_path: Path, failure: str) -> None:
    """``kill``: the victim SIGKILLs itself after writing 3 tensor chunks (its sockets close);
    ``stall``: it SIGSTOPs itself instead (sockets stay open; the others must give up on it)."""
    inputs = _inputs()
    codec = "none+chunk:32768"  # 8 chunks per slice: the victim fails having sent a few
    victim = 2
    extra: list[list[str]] = [[] for _ in range(N)]
    extra[victim] = ["--die-after-chunks" if failure == "kill" else "--stall-after-chunks", "3"]
    run = procs.start_mesh(tmp_path, inputs, size=SIZE, codecs=[codec], rounds=1, timeout=60, extra=extra)
    survivors = [w for i, w in enumerate(run.workers) if i != victim]
    try:
        run.wait(120, survivors)
    finally:
        run.close()
    dead = run.workers[victim]
    assert dead.proc is not None and dead.proc.returncode == -9, dead.log_text()
    assert dead.results() is None  # it never finished a round
    results = [w.results() for w in survivors]
    assert all(r is not None and r["error"] is None for r in results), run.logs()
    ids = {r["node_id"] for r in results if r}
    (victim_id,) = set(results[0]["group"]) - ids if results[0] else ()
    exact = _exact_mean([s for i, s in enumerate(inputs) if i != victim])
    for r in results:
        assert r is not None
        (round_,) = r["codecs"][codec]["rounds"]
        assert sorted(round_["contributors"]) == sorted(ids)
        assert set(round_["dropped"]) == {victim_id}
        assert round_["dropped"][victim_id] in ("DIED", "STALLED")
        np.testing.assert_array_equal(np.load(r["codecs"][codec]["output"]), exact)
    assert all("Traceback" not in w.log_text(100_000) for w in survivors), run.logs()


@pytest.mark.netns
def test_shaped_links_in_namespaces(tmp_path: Path) -> None:
    why = unavailable()
    if why:
        pytest.skip(f"network namespaces unavailable: {why}")
    n, size, rate = 3, 1 << 18, "200mbit"
    inputs = _inputs(n)
    with ShapedNet(n, rate=rate) as net:
        mesh = procs.finish(procs.start_mesh(tmp_path, inputs, size=size, codecs=["none"], rounds=1,
                                             timeout=60, net=net, extra=[["--bulk-congestion", "reno"]] * n),
                            120)
    exact = _exact_mean(inputs, size)
    for r in mesh:
        np.testing.assert_array_equal(_output(r, "none"), exact)
        assert r["bulk_congestion"] == ["reno"]  # every tensor link of every node, both directions
        assert r["address"].startswith(net.addresses[0].rsplit(".", 1)[0])
        (round_,) = r["codecs"]["none"]["rounds"]
        # a node sends 2(N-1)/N of the tensor; the link cannot carry it faster than its rate
        assert round_["sent_bytes"] >= 2 * (n - 1) / n * 4 * size
        assert round_["seconds"] >= 0.9 * round_["sent_bytes"] / rate_bytes_per_s(rate)
