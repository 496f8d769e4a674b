"""``node.joining``: the verdict of a join given up after ``--join-timeout`` (pure), and the
watcher over a scripted ``JoinState`` (short real timeouts, no sockets)."""

from __future__ import annotations

import asyncio
import builtins
import logging
from pathlib import Path

import pytest

from node import joining
from node.config import Address, NodeConfig
from node.joining import JoinWatch, SeedProblem, judge, resolve_error, verdict, watch_join
from node.membership import JoinState
from protocol.errors import TimeoutError

KEY = Path("/keys/mesh.key")


def _state(*, joined: bool = False, seeds: tuple[str, ...] = ("a:1", "b:2"), auth: tuple[str, ...] = (),
           unreachable: tuple[str, ...] = (), errors: dict[str, str] | None = None) -> JoinState:
    return JoinState(joined=joined, seeds=seeds, refused_auth=frozenset(auth),
                     unreachable=frozenset(unreachable), errors=errors or {})


@pytest.mark.parametrize(
    ("state", "resolve", "problem"),
    [
        (_state(auth=("a:1",), errors={"a:1": "AUTH_FAILED: mesh secret proof failed"}), None, SeedProblem.WRONG_KEY),
        (_state(unreachable=("a:1",), errors={"a:1": "TransportError: refused"}), None, SeedProblem.UNREACHABLE),
        (_state(unreachable=("a:1",)), "'a': Name or service not known", SeedProblem.UNRESOLVABLE),
        (_state(auth=("a:1",)), "'a': Temporary failure in name resolution", SeedProblem.WRONG_KEY),
        (_state(), None, SeedProblem.NO_ANSWER),
    ],
)
def test_judge(state: JoinState, resolve: str | None, problem: SeedProblem) -> None:
    assert judge("a:1", state, resolve).problem is problem


def test_verdict_names_every_seed_and_the_fix() -> None:
    wrong = [judge(s, _state(auth=("a:1", "b:2"), errors={s: "AUTH_FAILED: x"}), None) for s in ("a:1", "b:2")]
    text = verdict(wrong, timeout=60, mesh_key_path=KEY)
    assert text.splitlines()[0] == "join failed: no seed let this node in within 60 s (--join-timeout):"
    assert "  a:1: refused our mesh key (AUTH_FAILED: wrong mesh key)\n" in text
    assert f"every seed refused our mesh key: {KEY} is not the key of this mesh" in text
    gone = [judge("a:1", _state(unreachable=("a:1",), errors={"a:1": "TransportError: refused"}), None),
            judge("b:2", _state(), "'b': Name or service not known")]
    text = verdict(gone, timeout=1.5, mesh_key_path=KEY)
    assert "a:1: unreachable (TransportError: refused)" in text
    assert "b:2: its host name does not resolve ('b': Name or service not known)" in text
    assert "is a node running at each --join address" in text


async def test_resolve_error_only_for_names_that_do_not_resolve() -> None:
    assert await resolve_error("127.0.0.1:7400") is None
    assert await resolve_error("localhost:7400") is None
    assert await resolve_error("not an address") is None
    complaint = await resolve_error("no-such-host.invalid:7400")
    assert complaint is not None and complaint.startswith("'no-such-host.invalid': ")


async def test_watch_join_gives_up_at_the_deadline(monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(joining, "POLL_S", 0.01)
    caplog.set_level(logging.ERROR, logger="starmesh.node")
    state = _state(seeds=("10.0.0.1:1", "10.0.0.2:2"), auth=("10.0.0.1:1",), unreachable=("10.0.0.2:2",),
                   errors={"10.0.0.1:1": "AUTH_FAILED: x", "10.0.0.2:2": "T: y"})
    failures: list[str] = []
    loop = asyncio.get_running_loop()
    started = loop.time()
    await watch_join(state=lambda: state, timeout=0.1, mesh_key_path=KEY, on_failure=failures.append)
    assert loop.time() - started >= 0.1
    (failure,) = failures
    assert "10.0.0.1:1: refused our mesh key" in failure and "10.0.0.2:2: unreachable (T: y)" in failure
    # the wrong key is reported once, as soon as it is seen, naming the seed
    assert caplog.text.count("seed 10.0.0.1:1 refused our mesh key (AUTH_FAILED: wrong mesh key)") == 1


async def test_watch_join_returns_once_joined_and_never_gives_up_at_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(joining, "POLL_S", 0.01)
    polls = 0

    def state() -> JoinState:
        nonlocal polls
        polls += 1
        return _state(joined=polls > 20, unreachable=("a:1", "b:2"))

    failures: list[str] = []
    await watch_join(state=state, timeout=0.0, mesh_key_path=KEY, on_failure=failures.append)
    assert failures == [] and polls > 20
    await watch_join(state=lambda: _state(seeds=()), timeout=0.01, mesh_key_path=KEY, on_failure=failures.append)
    assert failures == []  # a new mesh: nothing to join


async def test_join_watch_stops_the_node_and_raises_the_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(joining, "POLL_S", 0.01)
    stopped: list[bool] = []
    config = NodeConfig(seeds=(Address("127.0.0.1", 1),), join_timeout=0.05)
    watch = JoinWatch(config, state=lambda: _state(seeds=("127.0.0.1:1",)), stop=lambda: stopped.append(True))
    watch.raise_if_failed()  # not yet
    await watch.run()
    assert stopped == [True]
    with pytest.raises(TimeoutError, match=r"127\.0\.0\.1:1: did not answer the join"):
        watch.raise_if_failed()
    remembered = JoinWatch(NodeConfig(join_timeout=0.05), state=lambda: _state(seeds=("127.0.0.1:1",)),
                           stop=lambda: stopped.append(True))
    with pytest.raises(builtins.TimeoutError):
        async with asyncio.timeout(0.2):  # rejoining remembered peers: never given up
            await remembered.run()
    assert stopped == [True]
