"""The pool's budgets against real ``python -m node`` processes (issue 10): a member killed
and restarted again and again leaves no dead links behind in the survivor (uvloop, the
default loop, made a link for every failed dial), and a stranger holding 100 idle TCP
connections does not keep ``status`` from answering."""

from __future__ import annotations

import asyncio
import selectors
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node.config import parse_address
from node.status import fetch_status, reply_to_json
from protocol.errors import StarmeshError
from simulations.nodeprocs import LocalMesh, NodeProcess, View, states, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
def local_mesh(tmp_path: Path) -> Iterator[LocalMesh]:
    mesh = LocalMesh(tmp_path, preset="test")
    try:
        yield mesh
    finally:
        mesh.close()
    crashed = [n for n in mesh.nodes if "Traceback" in n.log_text()]
    assert not crashed, "\n".join(n.log_text()[-3000:] for n in crashed)


def connections(view: View | None) -> dict[str, float]:
    """The node's open connections by channel, from its status metrics."""
    assert view is not None
    prefix = 'connections{channel="'
    return {k[len(prefix):-2]: v for k, v in view["metrics"].items() if k.startswith(prefix)}


def test_killed_and_restarted_member_leaves_no_dead_links(local_mesh: LocalMesh) -> None:
    survivor = local_mesh.add()
    local_mesh.wait_ready([survivor])
    member = local_mesh.add(seeds=[survivor.address])
    local_mesh.wait_ready([member])

    def seen(*wanted: str) -> bool:
        view = local_mesh.views([survivor])[survivor.node_id]
        return states(view).get(member.node_id, ("?", 0))[0] in wanted

    wait_for(lambda: seen("alive"), 20, what="member alive")
    counts: list[dict[str, float]] = []
    for _ in range(3):
        member.kill()  # SIGKILL: the survivor's probes dial its closed port
        wait_for(lambda: seen("suspect", "dead"), 20, what="member suspect", detail=survivor.log_text)
        member.restart()
        local_mesh.wait_ready([member])
        wait_for(lambda: seen("alive"), 20, what="member alive again", detail=survivor.log_text)

        def settled() -> bool:
            found = connections(local_mesh.views([survivor])[survivor.node_id])
            counts.append(found)
            # no half-open leftovers; a member link or two and our own status client
            return found.get("handshaking", 0) == 0 and sum(found.values()) <= 4

        wait_for(settled, 10, what="no dead links", detail=lambda: f"{counts[-1]}")


class Stranger(threading.Thread):
    """Holds ``n`` idle TCP connections (no byte sent) to ``address``, opening a new one
    whenever the node closes one."""

    def __init__(self, address: str, n: int) -> None:
        super().__init__(daemon=True)
        host, port = address.rsplit(":", 1)
        self.target = (host, int(port))
        self.n = n
        self.opened = 0
        self.closed_by_node = 0
        self.stop = threading.Event()

    def run(self) -> None:
        selector = selectors.DefaultSelector()
        held: set[socket.socket] = set()
        try:
            while not self.stop.is_set():
                while len(held) < self.n and not self.stop.is_set():
                    try:
                        s = socket.create_connection(self.target, timeout=1.0)
                    except OSError:
                        break
                    s.setblocking(False)
                    selector.register(s, selectors.EVENT_READ)
                    held.add(s)
                    self.opened += 1
                for key, _ in selector.select(timeout=0.05):
                    s = key.fileobj
                    assert isinstance(s, socket.socket)
                    try:
                        data = s.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:  # closed by the node: open another
                        selector.unregister(s)
                        s.close()
                        held.discard(s)
                        self.closed_by_node += 1
        finally:
            for s in held:
                s.close()
            selector.close()


def test_stranger_holding_100_idle_connections_does_not_stop_status(local_mesh: LocalMesh) -> None:
    node: NodeProcess = local_mesh.add()
    local_mesh.wait_ready([node])
    address = parse_address(node.address)
    stranger = Stranger(node.address, 100)
    stranger.start()
    try:
        wait_for(lambda: stranger.opened >= 100, 20, what="100 idle connections")

        async def ask(times: int) -> list[Any]:
            """``times`` status requests spread over 3 s: past the first flight deadline (2 s),
            while the stranger's connections are evicted, timed out and re-opened."""
            answers: list[Any] = []
            for _ in range(times):
                try:
                    answers.append(reply_to_json(await fetch_status(address, mesh_secret=local_mesh.secret,
                                                                    timeout=3.0)))
                except StarmeshError as exc:
                    answers.append(exc)
                await asyncio.sleep(3.0 / times)
            return answers

        answers = asyncio.run(ask(20))
        assert stranger.opened >= 100 and stranger.closed_by_node > 0  # still at it
    finally:
        stranger.stop.set()
        stranger.join(10)
    failed = [a for a in answers if isinstance(a, BaseException)]
    assert failed == [], f"{len(failed)} of 20 status requests failed: {failed[:3]}"
    last = answers[-1]
    assert last["self"]["id"] == node.node_id
    evicted = sum(v for k, v in last["metrics"].items() if k.startswith("evicted_handshakes_total"))
    assert evicted > 0
    log = node.log_text()
    assert log.count("evicted half-open") <= 5  # rate-limited: one line per 10 s
