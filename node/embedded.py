"""``MeshNode``: a ``Node`` on a background thread, for plain (synchronous) programs.

Training scripts and other frameworks rarely run an asyncio loop. ``MeshNode`` starts one
on a daemon thread, runs a ``Node`` in it, and offers blocking calls that hop onto that
loop (``asyncio.run_coroutine_threadsafe``)::

    from node.config import NodeConfig, parse_address
    from node.embedded import MeshNode

    config = NodeConfig(listen=parse_address("0.0.0.0:7400"), seeds=(...), tags=("job=resnet",))
    with MeshNode(config) as mesh:
        group = mesh.wait_for_members(4, tag="job=resnet")   # the 4 processes of this job
        out = mesh.all_reduce(np_array, group=group, codec="int8+zstd")
        out.tensor, out.contributors, out.dropped

Groups are scoped by tag: ``wait_for_members`` without one counts every alive member of the
mesh, daemons and other jobs included. ``all_reduce`` raises ``TooFewContributors`` when
the average would cover fewer than ``min_contributors`` members (default 2, so a group of
one fails unless ``min_contributors=1`` is passed). With an asyncio ``Node``, the coroutine
``wait_for_members(node, 4, tag=...)`` of this module is the same wait.

Arrays in, arrays out: numpy in gives numpy out, a torch tensor gives a torch tensor (same
shape, dtype and device). ``all_reduce_future`` returns a ``concurrent.futures.Future``
instead of blocking (the DDP comm hook in ``node.torch_hooks`` uses it). Leaving the
``with`` block leaves the mesh gracefully and joins the thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine, Iterable, Sequence
from types import TracebackType
from typing import Any, TypeVar

from discovery.members import MemberStatus, MemberView
from node.allreduce import AllReduceOutcome
from node.allreduce.events import TooFewContributors
from node.config import NodeConfig
from node.runtime import Node
from protocol.errors import ConfigError, StarmeshError, TimeoutError
from protocol.messages.gossip import is_tag

__all__ = ["GroupSpec", "MeshNode", "TooFewContributors", "alive_with_tag", "group_ids",
           "wait_for_members"]

T = TypeVar("T")

GroupSpec = Sequence[bytes | str]
"""Node ids as raw 32-byte ids or 64-character hex strings."""


def group_ids(group: GroupSpec) -> list[bytes]:
    """Raw node ids from ids or hex strings (``ConfigError`` on anything else)."""
    out = []
    for member in group:
        if isinstance(member, str):
            try:
                member = bytes.fromhex(member)
            except ValueError:
                raise ConfigError(f"group member {member!r:.70}: not a hex node id") from None
        out.append(member)
    return out


def alive_with_tag(members: Iterable[MemberView], tag: str | None) -> list[bytes]:
    """Ids of the alive ``members`` whose metadata carries ``tag`` (every alive one when
    ``tag`` is None), ascending. ``ConfigError`` if ``tag`` is not a valid ``KEY=VALUE`` tag."""
    if tag is not None and not is_tag(tag):
        raise ConfigError(f"tag {tag!r:.80}: expected KEY=VALUE, as given to --tag")
    return sorted(m.node_id for m in members
                  if m.status is MemberStatus.ALIVE and (tag is None or tag in m.meta.tags))


async def wait_for_members(node: Node, count: int, *, tag: str | None = None,
                           timeout: float = 30.0) -> list[bytes]:
    """Wait until at least ``count`` alive members carry ``tag`` (the node itself counts if
    it has the tag: ``NodeConfig(tags=...)``, ``--tag``); their ids, ascending: the group to
    pass to ``all_reduce``. When every process of a job waits for the job's size under the
    job's own tag, they all get the same list. ``TimeoutError`` after ``timeout`` seconds.

    Without ``tag`` it counts *every* alive member: daemons started with ``python -m node``
    and other programs' nodes join your group, and the group differs from member to member
    as they come and go. Pass a tag that only your job's processes carry. Use it from the
    node's loop (``await wait_for_members(node, 4, tag="job=x")``); ``MeshNode`` has the
    blocking twin."""
    if type(count) is not int or count < 1:
        raise ConfigError(f"count must be an int >= 1, got {count!r:.40}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        group = alive_with_tag(node.members(), tag)
        if len(group) >= count:
            return group
        if loop.time() > deadline:
            scope = "members" if tag is None else f"members tagged {tag}"
            raise TimeoutError(f"saw {len(group)} of {count} alive {scope} after {timeout}s")
        await asyncio.sleep(0.02)


class MeshNode:
    """A ``Node`` running on its own thread and event loop (see module docstring)."""

    def __init__(self, config: NodeConfig, *, start_timeout: float = 30.0, use_uvloop: bool = True) -> None:
        self.config = config
        self._start_timeout = start_timeout
        self._use_uvloop = use_uvloop and config.use_uvloop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._node: Node | None = None
        self._thread: threading.Thread | None = None
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._stopped: concurrent.futures.Future[None] = concurrent.futures.Future()

    # ---- lifecycle ------------------------------------------------------------------

    def __enter__(self) -> MeshNode:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def start(self) -> None:
        """Start the thread and wait until the node listens (``ConfigError`` etc. re-raised)."""
        if self._thread is not None:
            raise RuntimeError("MeshNode already started")
        self._thread = threading.Thread(target=self._main, name="starmesh-node", daemon=True)
        self._thread.start()
        try:
            self._ready.result(self._start_timeout)
        except concurrent.futures.TimeoutError:
            self.close()
            raise TimeoutError(f"the node did not start within {self._start_timeout}s") from None

    def close(self, timeout: float = 10.0) -> None:
        """Leave the mesh and stop the thread (idempotent)."""
        loop, node = self._loop, self._node
        if loop is not None and node is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(node.request_stop)
        if self._thread is not None:
            self._thread.join(timeout)

    def _main(self) -> None:
        factory = None
        if self._use_uvloop:
            with contextlib.suppress(ImportError):
                import uvloop

                factory = uvloop.new_event_loop
        try:
            with asyncio.Runner(loop_factory=factory) as runner:
                runner.run(self._serve())
        except BaseException as exc:
            if not self._ready.done():
                self._ready.set_exception(exc)
        finally:
            if not self._ready.done():
                self._ready.set_exception(StarmeshError("the node stopped before it started"))
            self._stopped.set_result(None)

    async def _serve(self) -> None:
        async with Node(self.config) as node:
            self._loop, self._node = asyncio.get_running_loop(), node
            self._ready.set_result(None)
            await node.run_until_stopped()

    # ---- calls onto the node's loop -------------------------------------------------

    @property
    def node(self) -> Node:
        """The underlying ``Node`` (only to be touched from its own loop)."""
        if self._node is None:
            raise RuntimeError("MeshNode is not running")
        return self._node

    @property
    def node_id(self) -> bytes:
        return self.node.node_id

    @property
    def address(self) -> str:
        return self.node.address

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coro`` on the node's loop; the future resolves with its result."""
        loop = self._loop
        if loop is None or loop.is_closed() or self._stopped.done():
            coro.close()
            raise StarmeshError("MeshNode is not running")
        return asyncio.run_coroutine_threadsafe(coro, loop)

    def members(self) -> list[MemberView]:
        """Every member this node knows (ourselves included)."""

        async def get() -> list[MemberView]:
            return self.node.members()

        return self.submit(get()).result()

    def wait_for_members(self, count: int, *, tag: str | None = None,
                         timeout: float = 30.0) -> list[bytes]:
        """Block until ``count`` alive members carry ``tag``; their ids, ascending (the
        blocking ``wait_for_members``: read its warning about ``tag=None``)."""
        future = self.submit(wait_for_members(self.node, count, tag=tag, timeout=timeout))
        return future.result()

    def all_reduce_future(self, tensor: Any, *, group: GroupSpec, codec: str = "none",
                          timeout: float | None = None, key: bytes | str | None = None,
                          min_contributors: int | None = None,
                          **options: Any) -> concurrent.futures.Future[AllReduceOutcome]:
        """Start an all-reduce (``Node.all_reduce``) and return its future at once."""
        ids = group_ids(group)
        return self.submit(self.node.all_reduce(tensor, group=ids, codec=codec, timeout=timeout,
                                                key=key, min_contributors=min_contributors,
                                                **options))

    def all_reduce(self, tensor: Any, *, group: GroupSpec, codec: str = "none",
                   timeout: float | None = None, key: bytes | str | None = None,
                   min_contributors: int | None = None, **options: Any) -> AllReduceOutcome:
        """Average ``tensor`` over ``group`` and block until done (``Node.all_reduce``).
        A result of fewer than ``min_contributors`` members (default 2; a group of one
        included) raises ``TooFewContributors`` (``AllReduceService.all_reduce``)."""
        return self.all_reduce_future(tensor, group=group, codec=codec, timeout=timeout, key=key,
                                      min_contributors=min_contributors, **options).result()
