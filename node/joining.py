"""Giving up a join after ``--join-timeout``, and saying why each seed failed.

A node started with seeds (``--join``) that no seed has let in after ``join_timeout``
seconds stops with an error, as ``serf agent -join`` does, naming each seed and its
problem (``SeedProblem``): it refused our mesh key (``AUTH_FAILED``), its host name does not
resolve, it is unreachable (refused, reset, timed out, another handshake error), or it
connected and never answered the join. The problems a user fixes at once (a wrong key, a
host name that does not resolve) are logged as soon as they are seen, once per seed; the
verdict waits for the deadline, since a seed may still be starting.

``watch_join`` is the watcher ``python -m node`` runs next to the node; it polls
``Membership.join_state()`` (which seeds' latest dial failed, how). Whether a host name
resolves it asks the resolver itself, since the dial's error text differs between loops.
``judge`` and ``verdict`` are pure.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from node.config import NodeConfig, parse_address
from node.membership import JoinState
from protocol.errors import ConfigError, TimeoutError

log = logging.getLogger("starmesh.node")

#: Seconds between two looks at the join's progress.
POLL_S = 0.2


class SeedProblem(enum.Enum):
    """Why a seed has not let us in, as the verdict words it."""

    WRONG_KEY = "refused our mesh key (AUTH_FAILED: wrong mesh key)"
    UNRESOLVABLE = "its host name does not resolve"
    UNREACHABLE = "unreachable"
    NO_ANSWER = "did not answer the join"


@dataclass(frozen=True, slots=True)
class SeedReport:
    address: str
    problem: SeedProblem
    detail: str
    """The error behind it (``TransportError: dial ...: Connect call failed``), or ``""``."""

    def line(self) -> str:
        return f"{self.address}: {self.problem.value}" + (f" ({self.detail})" if self.detail else "")


def judge(address: str, state: JoinState, resolve_error: str | None) -> SeedReport:
    """What is wrong with one seed, from the join state and whether its host name resolved
    (``resolve_error``: the resolver's message, None when it resolved or is an IP)."""
    detail = state.errors.get(address, "")
    if address in state.refused_auth:  # it answered, so its name resolved after all
        return SeedReport(address, SeedProblem.WRONG_KEY, "")  # the problem says it all
    if resolve_error is not None:
        return SeedReport(address, SeedProblem.UNRESOLVABLE, resolve_error)
    if address in state.unreachable:
        return SeedReport(address, SeedProblem.UNREACHABLE, detail)
    return SeedReport(address, SeedProblem.NO_ANSWER, detail)


def verdict(reports: Sequence[SeedReport], *, timeout: float, mesh_key_path: Path) -> str:
    """The error a node prints when it gives up joining: one line per seed and a hint."""
    lines = [f"join failed: no seed let this node in within {timeout:g} s (--join-timeout):"]
    lines += [f"  {r.line()}" for r in reports]
    problems = {r.problem for r in reports}
    if problems == {SeedProblem.WRONG_KEY}:
        lines.append(f"every seed refused our mesh key: {mesh_key_path} is not the key of this "
                     "mesh; copy the key file of a member (--mesh-key-file PATH)")
    elif problems <= {SeedProblem.UNREACHABLE, SeedProblem.UNRESOLVABLE}:
        lines.append("is a node running at each --join address, and is its port open to this "
                     "machine? (--join-timeout 0 keeps retrying)")
    return "\n".join(lines)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def resolve_error(address: str) -> str | None:
    """The resolver's complaint about ``address``'s host name; None if it resolves, is an IP
    or is not an address at all (the dial reports that)."""
    try:
        parsed = parse_address(address)
    except ConfigError:
        return None
    if _is_ip(parsed.host):
        return None
    try:
        await asyncio.get_running_loop().getaddrinfo(parsed.host, parsed.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        return f"{parsed.host!r}: {getattr(exc, 'strerror', None) or exc}"
    except OSError:
        return None
    return None


async def watch_join(
    *,
    state: Callable[[], JoinState],
    timeout: float,
    mesh_key_path: Path,
    on_failure: Callable[[str], None],
) -> None:
    """Log seed problems as they appear; call ``on_failure(verdict)`` if no seed let us in
    ``timeout`` seconds after the start (never when ``timeout`` is 0). Returns once joined."""
    loop = asyncio.get_running_loop()
    seeds = state().seeds
    if not seeds:
        return
    deadline = loop.time() + timeout if timeout > 0 else None
    unresolved = dict(zip(seeds, await asyncio.gather(*map(resolve_error, seeds)), strict=True))
    for address, complaint in unresolved.items():
        if complaint is not None:
            log.error("seed %s: its host name does not resolve (%s)", address, complaint)
    told: set[str] = set()
    while not (now := state()).joined:
        for address in sorted(now.refused_auth - told):
            told.add(address)
            log.error("seed %s refused our mesh key (AUTH_FAILED: wrong mesh key): %s is not "
                      "the key of the mesh at %s", address, mesh_key_path, address)
        if deadline is not None and loop.time() >= deadline:
            for address in [a for a, c in unresolved.items() if c is not None]:
                unresolved[address] = await resolve_error(address)  # the resolver came back?
            now = state()
            if now.joined:
                return
            reports = [judge(s, now, unresolved.get(s)) for s in now.seeds]
            on_failure(verdict(reports, timeout=timeout, mesh_key_path=mesh_key_path))
            return
        await asyncio.sleep(POLL_S)


class JoinWatch:
    """``--join-timeout`` for ``python -m node`` (``node.serve.run_node``)::

        watch = JoinWatch(config, state=node.join_state, stop=node.request_stop)
        node.spawn(watch.run())
        await node.run_until_stopped()
        ...                      # after the node has stopped:
        watch.raise_if_failed()  # TimeoutError with the verdict: exit 1

    Only ``--join`` seeds are given up on: a node rejoining through remembered peers keeps
    retrying (it may be the first of its mesh to restart), though it still logs problems.
    """

    def __init__(self, config: NodeConfig, *, state: Callable[[], JoinState],
                 stop: Callable[[], None]) -> None:
        self._timeout = config.join_timeout if config.seeds else 0.0
        self._key_path = config.mesh_key_path
        self._state = state
        self._stop = stop
        self.failure: str | None = None
        """The verdict once the join was given up."""

    async def run(self) -> None:
        await watch_join(state=self._state, timeout=self._timeout, mesh_key_path=self._key_path,
                         on_failure=self._give_up)

    def _give_up(self, verdict: str) -> None:
        self.failure = verdict
        log.error("no seed let this node in within %g s (--join-timeout): stopping", self._timeout)
        self._stop()

    def raise_if_failed(self) -> None:
        if self.failure is not None:
            raise TimeoutError(self.failure)
