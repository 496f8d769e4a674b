"""``python -m simulations.hostile_worker``: the adversary of ``python -m simulations chaos``.

One process, two faces:

* **A hostile member.** It runs a real ``Node`` with the mesh key (so it is a member that
  answers probes, is gossiped about and is trusted as SWIM trusts every member) and, on a
  seeded schedule (``--every`` seconds apart on average), attacks one honest target at a time
  (``--targets``: a JSON list of ``{"id", "address"}``, re-read before every attack):

  ``bad_frame``     a raw connection of its own (``protocol.Connection`` over a socket, the
                    member's identity or a fresh one) that breaks the wire: a sealed frame of
                    garbage, an unknown tag, a tampered ciphertext, a header announcing 2 GiB
                    followed by a trickle, a truncated frame, or garbage / a huge header
                    before the handshake; it records whether the node closed on it
  ``suspect_lie``   SUSPECT about another honest member X at X's incarnation (X can refute)
  ``dead_lie``      DEAD about X at X's incarnation (X can refute; the others see it dead
                    until the refutation reaches them)
  ``self_max``      claims about the target itself: SUSPECT, DEAD and ALIVE (at an address
                    that is not its own) at 2^64-1, and SUSPECT at 2^62 (an honest node
                    refuses them: no refutation could beat them, and the next start must
                    accept what it persists)
  ``others_max``    ALIVE, SUSPECT and DEAD about members that do not exist at 2^64-1 (no
                    code path may add one to someone else's incarnation)
  ``fake_flood``    ALIVE for ``--fake-batch`` random node ids at closed loopback ports (the
                    target probes them: dials that fail)
  ``closed_dials``  PING_REQs asking the target to probe random ids at closed ports
  ``ar_flood``      maximal AR_REPORTs (~660 KB each) for random round ids that never start

  Claims that no member could refute (SUSPECT or DEAD about an honest X at 2^64-1) are left
  out on purpose: SWIM trusts members, so one such claim takes X out of the mesh for good,
  and the rest of the run would measure nothing but that.

* **Strangers.** ``--strangers K`` TCP connections to every target without the key: half
  idle (no byte sent), half half-open (a handshake frame's header and a few of its bytes),
  each re-opened 0.5 s after the node closes it. They come from the loopback addresses of
  ``--stranger-ips`` in turn (Linux routes all of 127/8 to ``lo``), as strangers on other
  hosts would: from 127.0.0.1 they would share the honest members' per-address quota.

Every act is one JSON line in ``--acts`` (``t`` unix time, ``kind``, ``to`` and ``about``
node ids in hex, ``inc``, ``ok``, ``detail``), which the harness matches against the deaths
it sees. SIGTERM stops the attacks and the strangers, then the member leaves.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import random
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.identity import load_identity, load_mesh_key
from node.runtime import Node
from protocol import crypto
from protocol.connection import (
    NEED_DATA,
    Channel,
    Connection,
    ConnectionTerminated,
    HandshakeComplete,
    HandshakeOptions,
    Role,
)
from protocol.errors import StarmeshError
from protocol.framing import HEADER
from protocol.messages.gossip import Alive, Dead, NodeMeta, PingReq, Suspect
from protocol.messages.tensor import MAX_GROUP, ArReport, Holding
from protocol.schema import Message, encode_body
from simulations.worker_node import add_node_arguments, node_config, setup_logging

MAX_U64 = (1 << 64) - 1
#: Incarnation claims at 2^62: the highest a member gives itself (``discovery.incarnation``).
AT_2_62 = 1 << 62
#: Seconds a raw connection waits for the node to answer or close.
RAW_TIMEOUT_S = 2.0

Target = dict[str, str]


@dataclasses.dataclass
class Hostile:
    node: Node
    rng: random.Random
    secret: bytes
    identity: Ed25519PrivateKey
    acts_path: Path
    targets_path: Path
    args: argparse.Namespace
    closed_ports: list[int] = dataclasses.field(default_factory=list)
    _big_holdings: tuple[Holding, ...] = ()

    # ---- bookkeeping ------------------------------------------------------------------

    def targets(self) -> list[Target]:
        try:
            data: list[Target] = json.loads(self.targets_path.read_text())
        except (OSError, ValueError):
            return []
        return data

    def record(self, kind: str, to: str, *, about: list[str] | None = None, inc: int | None = None,
               ok: bool = True, detail: str = "") -> None:
        line = {"t": time.time(), "kind": kind, "to": to, "about": about or [], "inc": inc,
                "ok": ok, "detail": detail[:300]}
        with open(self.acts_path, "a") as f:
            f.write(json.dumps(line) + "\n")

    def incarnation_of(self, node_id: bytes) -> int | None:
        for m in self.node.members():
            if m.node_id == node_id:
                return m.incarnation
        return None

    def closed_address(self) -> str:
        return f"127.0.0.1:{self.rng.choice(self.closed_ports)}"

    async def send(self, to: bytes, messages: list[Message]) -> int:
        """Send ``messages`` over the member's own CONTROL link to ``to``; how many went."""
        sent = 0
        for msg in messages:
            await self.node.send(to, msg, channel=Channel.CONTROL)
            sent += 1
        return sent

    # ---- the attacks ------------------------------------------------------------------

    async def suspect_lie(self, target: Target) -> None:
        await self._lie(target, "suspect_lie", Suspect)

    async def dead_lie(self, target: Target) -> None:
        await self._lie(target, "dead_lie", Dead)

    async def _lie(self, target: Target, kind: str, cls: type[Suspect] | type[Dead]) -> None:
        others = [t for t in self.targets() if t["id"] != target["id"]]
        if not others:
            return
        about = self.rng.choice(others)
        inc = self.incarnation_of(bytes.fromhex(about["id"]))
        if inc is None:
            return
        msg = cls(incarnation=inc, node=bytes.fromhex(about["id"]), sender=self.node.node_id)
        await self._send_recorded(kind, target, [msg], about=[about["id"]], inc=inc)

    async def self_max(self, target: Target) -> None:
        me, tid = self.node.node_id, bytes.fromhex(target["id"])
        msgs: list[Message] = [
            Suspect(incarnation=MAX_U64, node=tid, sender=me),
            Dead(incarnation=MAX_U64, node=tid, sender=me),
            Alive(incarnation=MAX_U64, node=tid, address=self.closed_address(), meta=NodeMeta()),
            Suspect(incarnation=AT_2_62, node=tid, sender=me),
        ]
        await self._send_recorded("self_max", target, msgs, about=[target["id"]], inc=MAX_U64)

    async def others_max(self, target: Target) -> None:
        fake = self.rng.randbytes(32)
        msgs: list[Message] = [
            Alive(incarnation=MAX_U64, node=fake, address=self.closed_address(), meta=NodeMeta()),
            Suspect(incarnation=MAX_U64, node=fake, sender=self.node.node_id),
            Dead(incarnation=MAX_U64, node=fake, sender=self.node.node_id),
            Alive(incarnation=MAX_U64, node=fake, address=self.closed_address(), meta=NodeMeta()),
        ]
        await self._send_recorded("others_max", target, msgs, about=[fake.hex()], inc=MAX_U64)

    async def fake_flood(self, target: Target) -> None:
        msgs: list[Message] = [
            Alive(incarnation=self.rng.randrange(1 << 32), node=self.rng.randbytes(32),
                  address=self.closed_address(), meta=NodeMeta())
            for _ in range(self.args.fake_batch)]
        await self._send_recorded("fake_flood", target, msgs, detail=f"{len(msgs)} fake members")

    async def closed_dials(self, target: Target) -> None:
        msgs: list[Message] = [
            PingReq(seq=self.rng.randrange(1 << 32), target=self.rng.randbytes(32),
                    address=self.closed_address(), nack=True)
            for _ in range(self.args.dial_batch)]
        await self._send_recorded("closed_dials", target, msgs, detail=f"{len(msgs)} PING_REQs")

    async def ar_flood(self, target: Target) -> None:
        if not self._big_holdings:
            senders = tuple(range(MAX_GROUP))
            norms = tuple(float(i) for i in range(MAX_GROUP))
            self._big_holdings = tuple(Holding(slice=s, senders=senders, sq_norms=norms)
                                       for s in range(MAX_GROUP))
        msgs: list[Message] = [
            ArReport(round_id=self.rng.randbytes(16), epoch=0, leader=0, holdings=self._big_holdings,
                     averages=(), exclusions=())
            for _ in range(self.args.ar_batch)]
        await self._send_recorded("ar_flood", target, msgs, detail=f"{len(msgs)} AR_REPORTs")

    async def _send_recorded(self, kind: str, target: Target, msgs: list[Message], *,
                             about: list[str] | None = None, inc: int | None = None,
                             detail: str = "") -> None:
        sent, error = 0, ""
        try:
            sent = await asyncio.wait_for(self.send(bytes.fromhex(target["id"]), msgs), 10.0)
        except (StarmeshError, TimeoutError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        self.record(kind, target["id"], about=about, inc=inc, ok=sent == len(msgs),
                    detail=f"{detail} sent {sent}/{len(msgs)} {error}".strip())

    async def bad_frame(self, target: Target) -> None:
        variants: dict[str, Callable[[Target], Awaitable[str]]] = {
            "sealed_garbage": self._sealed_garbage, "unknown_tag": self._unknown_tag,
            "tampered": self._tampered, "huge_header": self._huge_header,
            "truncated": self._truncated, "pre_garbage": self._pre_garbage,
            "pre_huge_header": self._pre_huge_header,
        }
        name = self.rng.choice(sorted(variants))
        try:
            outcome = await variants[name](target)
            ok = True
        except (OSError, StarmeshError, TimeoutError) as exc:
            outcome, ok = f"{type(exc).__name__}: {exc}", False
        self.record("bad_frame", target["id"], ok=ok, detail=f"{name}: {outcome}")

    # ---- raw connections --------------------------------------------------------------

    async def _open(self, target: Target, *, handshake: bool) -> tuple[asyncio.StreamReader, asyncio.StreamWriter,
                                                                        Connection | None]:
        host, port = target["address"].rsplit(":", 1)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), RAW_TIMEOUT_S)
        if not handshake:
            return reader, writer, None
        identity = self.identity if self.rng.random() < 0.5 else crypto.generate_identity()
        conn = Connection(role=Role.INITIATOR, identity=identity, mesh_secret=self.secret,
                          options=HandshakeOptions(self.node.address, Channel.CONTROL),
                          now=asyncio.get_running_loop().time())
        writer.write(conn.data_to_send())
        async with asyncio.timeout(RAW_TIMEOUT_S):
            while True:
                data = await reader.read(65536)
                conn.receive_data(data)
                while (event := conn.next_event()) is not NEED_DATA:
                    if isinstance(event, HandshakeComplete):
                        writer.write(conn.data_to_send())  # our FINISH
                        return reader, writer, conn
                    if isinstance(event, ConnectionTerminated):
                        raise StarmeshError(f"handshake refused: {event.error}")
                if not data:
                    raise StarmeshError("closed during the handshake")

    @staticmethod
    def _seal(conn: Connection, body: bytes) -> bytes:
        """A frame an authenticated peer would write for ``body`` (any bytes): sealed with the
        session key, as ``protocol.testing.ConnectionPair.inject`` does."""
        tx = conn._tx
        assert tx is not None
        sealed = tx.seal(body)
        return HEADER.pack(len(sealed)) + sealed

    async def _finish(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes,
                      *, eof: bool = False) -> str:
        """Write ``data`` (then EOF if asked), wait for the node to close; what happened."""
        writer.write(data)
        if eof:
            writer.write_eof()
        got = 0
        try:
            async with asyncio.timeout(RAW_TIMEOUT_S):
                while chunk := await reader.read(65536):
                    got += len(chunk)
            verdict = f"closed by the node ({got} bytes back)"
        except TimeoutError:
            verdict = f"still open after {RAW_TIMEOUT_S:g} s"
        except OSError as exc:
            verdict = f"reset ({exc.strerror or exc})"
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return verdict

    async def _sealed_garbage(self, target: Target) -> str:
        reader, writer, conn = await self._open(target, handshake=True)
        assert conn is not None
        return await self._finish(reader, writer, self._seal(conn, self.rng.randbytes(200)))

    async def _unknown_tag(self, target: Target) -> str:
        reader, writer, conn = await self._open(target, handshake=True)
        assert conn is not None
        return await self._finish(reader, writer, self._seal(conn, msgpack.packb({"t": 60000, "x": 1})))

    async def _tampered(self, target: Target) -> str:
        reader, writer, conn = await self._open(target, handshake=True)
        assert conn is not None
        frame = bytearray(self._seal(conn, encode_body(Suspect(incarnation=0, node=bytes(32),
                                                               sender=bytes(32)))))
        frame[-1] ^= 0x01  # the tag no longer matches
        return await self._finish(reader, writer, bytes(frame))

    async def _huge_header(self, target: Target) -> str:
        reader, writer, conn = await self._open(target, handshake=True)
        assert conn is not None
        return await self._finish(reader, writer, HEADER.pack((1 << 31) - 1) + self.rng.randbytes(5))

    async def _truncated(self, target: Target) -> str:
        reader, writer, conn = await self._open(target, handshake=True)
        assert conn is not None
        return await self._finish(reader, writer, HEADER.pack(1000) + self.rng.randbytes(10), eof=True)

    async def _pre_garbage(self, target: Target) -> str:
        reader, writer, _ = await self._open(target, handshake=False)
        return await self._finish(reader, writer, self.rng.randbytes(200))

    async def _pre_huge_header(self, target: Target) -> str:
        reader, writer, _ = await self._open(target, handshake=False)
        return await self._finish(reader, writer, HEADER.pack(1 << 31))

    # ---- the schedule -----------------------------------------------------------------

    async def attack_forever(self, stop: asyncio.Event) -> None:
        attacks: dict[str, Callable[[Target], Awaitable[None]]] = {
            "bad_frame": self.bad_frame, "suspect_lie": self.suspect_lie, "dead_lie": self.dead_lie,
            "self_max": self.self_max, "others_max": self.others_max, "fake_flood": self.fake_flood,
            "closed_dials": self.closed_dials, "ar_flood": self.ar_flood,
        }
        chosen = [a for a in self.args.attacks.split(",") if a] or sorted(attacks)
        unknown = set(chosen) - set(attacks)
        if unknown:
            raise SystemExit(f"unknown attacks {sorted(unknown)}; known: {sorted(attacks)}")
        names = sorted(chosen)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.rng.expovariate(1.0 / self.args.every))
            targets = self.targets()
            if stop.is_set() or not targets:
                continue
            kind = self.rng.choice(names)
            target = self.rng.choice(targets)
            try:
                await attacks[kind](target)
            except Exception as exc:  # the adversary's own failure: recorded, never fatal
                self.record(kind, target["id"], ok=False, detail=f"{type(exc).__name__}: {exc}")


async def stranger(address: str, *, half_open: bool, rng: random.Random, stop: asyncio.Event,
                   opened: list[int], source: str | None) -> None:
    """One keyless connection to ``address`` (from ``source``, an IP, if given), re-opened
    0.5 s after each close until ``stop``."""
    host, port = address.rsplit(":", 1)
    local = (source, 0) if source else None
    while not stop.is_set():
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, int(port), local_addr=local), 3.0)
        except (OSError, TimeoutError):
            await asyncio.sleep(0.5)
            continue
        opened[0] += 1
        if half_open:  # a handshake frame's length and the first bytes of its body
            writer.write(HEADER.pack(300) + rng.randbytes(20))
        closed = asyncio.ensure_future(reader.read())
        stopping = asyncio.ensure_future(stop.wait())
        with contextlib.suppress(OSError):
            await asyncio.wait({closed, stopping}, return_when=asyncio.FIRST_COMPLETED)
        for fut in (closed, stopping):
            fut.cancel()
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        if not stop.is_set():
            await asyncio.sleep(0.5)


def closed_ports(n: int) -> list[int]:
    """``n`` loopback ports nobody listens on (bound, then released)."""
    ports = []
    for _ in range(n):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(int(s.getsockname()[1]))
    return ports


async def _main(args: argparse.Namespace) -> int:
    config = dataclasses.replace(node_config(args, seed=args.seed), tags=("chaos=hostile",))
    rng = random.Random(f"hostile:{args.seed}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with Node(config) as node:
        hostile = Hostile(node=node, rng=rng, secret=load_mesh_key(Path(args.mesh_key_file)),
                          identity=load_identity(Path(args.data_dir) / "identity.key"),
                          acts_path=Path(args.acts), targets_path=Path(args.targets), args=args,
                          closed_ports=closed_ports(16))
        opened = [0]
        ips = [ip for ip in args.stranger_ips.split(",") if ip] or [None]
        async with asyncio.TaskGroup() as group:
            group.create_task(hostile.attack_forever(stop))
            started: set[str] = set()
            while not stop.is_set():  # strangers for every target, as targets appear
                for target in hostile.targets():
                    if target["address"] in started:
                        continue
                    started.add(target["address"])
                    for i in range(args.strangers):
                        group.create_task(stranger(target["address"], half_open=i % 2 == 1,
                                                   rng=random.Random(f"{args.seed}:{target['id']}:{i}"),
                                                   stop=stop, opened=opened, source=ips[i % len(ips)]))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
        hostile.record("stopped", "", detail=f"{opened[0]} stranger connections opened")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulations.hostile_worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_node_arguments(parser)
    parser.add_argument("--targets", required=True, help="JSON file: [{id, address}] of honest members")
    parser.add_argument("--acts", required=True, help="JSON-lines file this process appends its acts to")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--attacks", default="", help="comma-separated attack kinds to use (default: all)")
    parser.add_argument("--every", type=float, default=1.0, help="mean seconds between two attacks")
    parser.add_argument("--strangers", type=int, default=80, help="keyless connections per target")
    parser.add_argument("--stranger-ips", default="127.0.1.1,127.0.1.2,127.0.1.3,127.0.1.4",
                        help="comma-separated source IPs of the strangers ('': the system's choice)")
    parser.add_argument("--fake-batch", type=int, default=50, help="fake members per flood")
    parser.add_argument("--dial-batch", type=int, default=32, help="PING_REQs per closed-port attack")
    parser.add_argument("--ar-batch", type=int, default=30, help="AR_REPORTs per flood")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
