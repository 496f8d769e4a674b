"""The node's one configuration tree, and the parsing of addresses it is made of.

``NodeConfig`` holds what the node itself needs and one nested frozen config per layer:
``links`` (``LinkConfig``: every connection), ``executors`` (``ExecutorConfig``: the thread
pools), ``allreduce`` (``node.allreduce.config.AllReduceSettings``). SWIM timing is a named
preset of ``discovery.config.PRESETS``. ``ClientConfig`` is what the client commands
(``status`` ...) share.

Every field is written once, here: its type, its default and the docstring under it. The
``run`` command's flags and ``STARMESH_*`` environment variables are generated from these
fields (``node/options.py``; the docstring is the ``--help`` text). Each class validates its
own fields in ``__post_init__``: invalid values raise ``ConfigError`` naming the setting.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from discovery.config import PRESETS as SWIM_PRESETS
from node.allreduce.config import AllReduceSettings
from node.blobs.config import BlobConfig
from node.tasks.config import TaskConfig
from protocol.errors import ConfigError
from protocol.messages.gossip import MAX_TAG_LEN, MAX_TAGS, is_tag

DEFAULT_PORT = 7400

DEFAULT_DATA_DIR = "~/.starmesh"

#: SWIM timing presets a node can run with: the names of ``discovery.config.PRESETS``.
PRESET_NAMES: tuple[str, ...] = tuple(SWIM_PRESETS)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

#: Host part of an address as the wire accepts it (protocol/messages/gossip.py ADDRESS_PATTERN).
_HOST = re.compile(r"[0-9A-Fa-f:.]{2,45}|[A-Za-z0-9._-]{1,253}")


@dataclass(frozen=True, slots=True, order=True)
class Address:
    """A TCP endpoint ``host:port``; IPv6 hosts are written ``[v6]:port``."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_unspecified(self) -> bool:
        """True for the wildcard hosts ``0.0.0.0`` and ``::`` (listen on every interface)."""
        return self.host in ("0.0.0.0", "::", "")

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_address(text: str, *, what: str = "address", default_port: int | None = None) -> Address:
    """Parse ``host:port`` / ``[v6]:port`` (``host`` alone when ``default_port`` is given)."""
    raw = text.strip()
    if "://" in raw:  # a URL: say what to write instead (before the IPv6 rule sees its colons)
        bare = raw.split("://", 1)[1].split("/", 1)[0] or "HOST"
        if not bare.rpartition("]")[2].count(":"):
            bare += f":{'PORT' if default_port is None else default_port}"
        raise ConfigError(f"{what} {text!r}: expected HOST:PORT without a scheme or path, e.g. {bare!r}")
    if raw.startswith("["):
        close = raw.find("]")
        rest = raw[close + 1 :] if close > 0 else "?"
        if rest and not rest.startswith(":"):
            raise ConfigError(f"{what} {text!r}: expected [host]:port")
        host, port_text = raw[1:close], rest[1:]
    elif raw.count(":") == 1:
        host, port_text = raw.split(":")
    elif ":" in raw:
        raise ConfigError(f"{what} {text!r}: write IPv6 addresses as [host]:port")
    else:
        host, port_text = raw, ""
    if not port_text:
        if default_port is None:
            raise ConfigError(f"{what} {text!r}: expected host:port")
        port_text = str(default_port)
    if not _HOST.fullmatch(host):
        raise ConfigError(f"{what} {text!r}: missing or invalid host")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{what} {text!r}: port must be an integer 0..65535")
    return Address(host, int(port_text))


_CONGESTION_NAME = re.compile(r"[a-z0-9_]{1,15}")


def validate_congestion_name(name: str) -> str:
    """``name`` if it can be a TCP congestion control algorithm's name, else ``ConfigError``
    (whether this kernel offers it is checked when the node starts: ``node.congestion``)."""
    if not _CONGESTION_NAME.fullmatch(name):
        raise ConfigError(f"congestion control {name!r}: expected a name such as cubic or bbr")
    return name


def check_tags(tags: object) -> None:
    """``ConfigError`` unless ``tags`` is a tuple of distinct member tags (``NodeMeta.tags``)."""
    if type(tags) is not tuple:
        raise ConfigError(f"tags must be a tuple of KEY=VALUE strings, got {type(tags).__name__}")
    if len(tags) > MAX_TAGS:
        raise ConfigError(f"{len(tags)} tags: at most {MAX_TAGS}")
    for tag in tags:
        if not is_tag(tag):
            raise ConfigError(f"tag {tag!r:.80}: expected KEY=VALUE of at most {MAX_TAG_LEN} "
                              "characters: letters, digits, _ . - (the value also : / @ +)")
    if len(set(tags)) != len(tags):
        raise ConfigError(f"tags list one twice: {', '.join(tags)}")


def default_data_dir() -> Path:
    """``DEFAULT_DATA_DIR`` with ``~`` expanded (read when a config is built)."""
    return Path(DEFAULT_DATA_DIR).expanduser()


def _seconds(name: str, value: float, low: float, high: float, *, zero_ok: bool = False) -> None:
    """Reject ``value`` (NaN too) outside ``(low, high]`` (``[low, high]`` when ``zero_ok``)."""
    ok = low <= value <= high if zero_ok else low < value <= high
    if not ok:
        span = f"[{low:g}, {high:g}] (0: off)" if zero_ok else f"({low:g}, {high:g}]"
        raise ConfigError(f"{name.replace('_', ' ')} {value!r}: expected seconds in {span}")


def _at_least_one(owner: object, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(owner, name) < 1:
            raise ConfigError(f"{name.replace('_', ' ')} must be >= 1, got {getattr(owner, name)!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkConfig:
    """What every connection of one node shares: timeouts, limits, buffers."""

    handshake_timeout: float = 5.0
    """Seconds a connection may take to finish its handshake before it is closed."""

    first_flight_timeout: float = 2.0
    """Seconds an inbound connection may take to send its first handshake flight (INIT: one
    round trip after the connect) before it is closed; a stranger holding idle sockets frees
    their handshake slots this soon. Above ``handshake_timeout`` it has no effect."""

    dial_timeout: float = 2.0
    """Seconds a TCP connect to a peer may take before the peer counts as unreachable."""

    max_connections: int = 512
    """Most connections to and from members (outbound ones, and inbound ones once their
    handshake names a member channel); a dial beyond it fails, an inbound member connection
    beyond it is closed. Status clients and handshakes have budgets of their own."""

    max_handshaking: int = 64
    """Most inbound connections still in their handshake: a new one is not refused but
    evicts the oldest that sent no first flight within ``eviction_grace``. Connections still
    in their grace may exceed it up to 4 times; there the oldest is evicted at once."""

    max_handshaking_per_address: int = 16
    """Most inbound connections still in their handshake from one IP address: a new one from
    that address evicts its oldest that sent no first flight within ``eviction_grace``."""

    eviction_grace: float = 0.25
    """Seconds a new inbound connection is safe from eviction by the handshake limits: time
    for its first flight to be read (connections accepted in one burst are all handled before
    any of them is read). 0: evict at once."""

    max_client_connections: int = 32
    """Most open CLIENT connections (status tools); a new one closes the client idle the
    longest."""

    client_idle_timeout: float = 10.0
    """Seconds a CLIENT connection (status tool) may carry no bytes before it is closed with
    a goodbye. 0 disables it."""

    inbox_messages: int = 64
    """Messages buffered per connection before reading from it is paused (backpressure)."""

    inbox_bytes: int = 32 * 1024 * 1024
    """Bytes of frames buffered per connection before reading from it is paused (or
    ``inbox_messages`` messages, whichever comes first): with 8 MiB frames a message count
    alone would let a peer park half a GiB per connection."""

    write_buffer_bytes: int = 8 * 1024 * 1024
    """Per-connection write buffer above which best-effort gossip is dropped and senders wait."""

    idle_timeout: float = 300.0
    """Seconds a connection to a peer (or a status client) may carry no bytes in either
    direction, with nothing left to write, before it is closed with a goodbye; it is dialed
    again when next needed. 0 disables idle closing."""

    bulk_congestion: str | None = None
    """TCP congestion control of BULK (tensor) links, e.g. ``cubic`` or ``bbr``; None
    keeps the system default. Checked when the node starts (``node.congestion``)."""

    def __post_init__(self) -> None:
        _seconds("handshake_timeout", self.handshake_timeout, 0.0, 600.0)
        _seconds("first_flight_timeout", self.first_flight_timeout, 0.0, 600.0)
        _seconds("client_idle_timeout", self.client_idle_timeout, 0.0, 86400.0, zero_ok=True)
        _seconds("eviction_grace", self.eviction_grace, 0.0, 600.0, zero_ok=True)
        _seconds("dial_timeout", self.dial_timeout, 0.0, 600.0)
        _seconds("idle_timeout", self.idle_timeout, 0.0, 86400.0, zero_ok=True)
        _at_least_one(self, ("max_connections", "max_handshaking", "max_handshaking_per_address",
                             "max_client_connections", "inbox_messages", "inbox_bytes",
                             "write_buffer_bytes"))
        if self.bulk_congestion is not None:
            validate_congestion_name(self.bulk_congestion)


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecutorConfig:
    """Sizes of the node's thread pools, one per kind of work (``node.context.Executors``),
    so services never starve each other."""

    codec_threads: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    """Threads for tensor encode/decode and zstd (short CPU bursts that release the GIL);
    ``min(4, os.cpu_count())`` unless set."""

    compute_threads: int = 2
    """Threads for longer CPU work (hashing, assembling results)."""

    io_threads: int = 4
    """Threads for blocking disk reads and writes."""

    def __post_init__(self) -> None:
        for name in ("codec_threads", "compute_threads", "io_threads"):
            value = getattr(self, name)
            if type(value) is not int or not 1 <= value <= 1024:
                raise ConfigError(f"{name.replace('_', ' ')} {value!r}: expected an integer in 1..1024")


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    """How one node runs. Build it with ``NodeConfig(...)`` or from the CLI (``node/cli.py``)."""

    listen: Address = field(default_factory=lambda: Address("0.0.0.0", DEFAULT_PORT))
    """Where to accept TCP connections (HOST:PORT, or HOST for the default port). Port 0
    picks a free port (see ``ready_file``)."""

    advertise: Address | None = None
    """The address peers dial to reach us. None: the listen address, except that a wildcard
    host is replaced by this host's outward-facing IP (loopback when listening on loopback);
    a port of 0 is replaced by the port actually bound."""

    data_dir: Path = field(default_factory=default_data_dir)
    """Holds ``identity.key`` (Ed25519, 0600), ``incarnation``, ``peers`` and, by default,
    ``mesh.key``."""

    seeds: tuple[Address, ...] = ()
    """Members to join through (push/pull with the first that answers). Empty: the live
    members remembered in ``<data_dir>/peers`` from the last run, if any, else a new mesh."""

    join_timeout: float = 60.0
    """Seconds a node given seeds waits for one to answer its join; then it stops with an
    error saying why each seed failed (refused our mesh key, unreachable, host name not
    resolvable), as ``serf agent -join`` does. 0: retry forever. A node rejoining through
    remembered peers keeps retrying (it may be the first of its mesh to restart). Applied by
    ``python -m node`` (``node.joining.JoinWatch``); a program running ``Node`` itself reads
    ``node.join_state()``."""

    mesh_key_file: Path | None = None
    """The mesh secret file; None means ``<data_dir>/mesh.key``. Created (0600) only by a node
    starting a new mesh (no seeds, no remembered peers); a joining node needs a copy of its
    mesh's file and stops with an error without one."""

    preset: str = "lan"
    """SWIM timing preset (``discovery.config.PRESETS``): ``lan``, ``wan``, ``local`` (one
    host) or ``test`` (fast, for tests)."""

    log_level: str = "INFO"
    """Lowest log level printed to stderr: DEBUG, INFO, WARNING or ERROR."""

    ready_file: Path | None = None
    """If set, written once listening and joining: JSON ``{"address", "listen", "node_id", "pid",
    "ready_at"}`` (``ready_at``: Unix time, for benchmarks measuring from that moment)."""

    leave_timeout: float = 1.0
    """Seconds spent, on shutdown, flushing our leave announcement before closing sockets."""

    use_uvloop: bool = True
    """Run on uvloop when it is installed (``auto``), else on plain asyncio."""

    seed: int | None = None
    """Seed of the node's ``random.Random`` (probe order, jitter). None: from the OS."""

    metrics_listen: Address | None = None
    """Serve Prometheus metrics over HTTP on this HOST:PORT (path ``/metrics``). None: no
    metrics endpoint."""

    tags: tuple[str, ...] = ()
    """Tags this node advertises to the mesh, each KEY=VALUE (``job=resnet``; repeat the flag
    for more): at most 16 of at most 64 characters, ASCII letters, digits and ``_.-`` (the
    value also ``:/@+``). Programs scope groups by them: ``wait_for_members(n, tag="job=resnet")``."""

    links: LinkConfig = field(default_factory=LinkConfig)
    """Connections: timeouts, limits and buffers every link of the node shares."""

    executors: ExecutorConfig = field(default_factory=ExecutorConfig)
    """Thread pools of the node, one per kind of work."""

    allreduce: AllReduceSettings = field(default_factory=AllReduceSettings)
    """All-reduce defaults: what a round gets when its caller passes no ``AllReduceConfig``."""

    tasks: TaskConfig = field(default_factory=TaskConfig)
    """What this node runs for tasks, and what it keeps of them."""

    blobs: BlobConfig = field(default_factory=BlobConfig)
    """The blob cache: its bound, this node's upload rate and the leases of copies."""

    def __post_init__(self) -> None:
        if self.preset not in PRESET_NAMES:
            raise ConfigError(f"preset {self.preset!r}: expected one of {', '.join(PRESET_NAMES)}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ConfigError(f"log level {self.log_level!r}: expected one of {', '.join(LOG_LEVELS)}")
        _seconds("leave_timeout", self.leave_timeout, 0.0, 600.0)
        _seconds("join_timeout", self.join_timeout, 0.0, 86400.0, zero_ok=True)
        if self.advertise is not None and (self.advertise.is_unspecified or self.advertise.port == 0):
            raise ConfigError(f"advertise address {self.advertise}: needs a concrete host and port")
        check_tags(self.tags)

    @property
    def mesh_key_path(self) -> Path:
        return self.mesh_key_file if self.mesh_key_file is not None else self.data_dir / "mesh.key"

    @property
    def identity_path(self) -> Path:
        return self.data_dir / "identity.key"

    @property
    def incarnation_path(self) -> Path:
        return self.data_dir / "incarnation"

    @property
    def peers_path(self) -> Path:
        return self.data_dir / "peers"

    def advertise_for(self, bound: Address, *, local_ip: Callable[[], str]) -> Address:
        """The address to advertise once the listener is bound to ``bound``; a wildcard
        listen host is replaced by ``local_ip()`` (``node.pool.guess_local_ip``)."""
        if self.advertise is not None:
            return self.advertise
        host = self.listen.host
        if self.listen.is_unspecified:
            host = local_ip()
        elif host == "localhost":
            host = "127.0.0.1"
        return Address(host, bound.port)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientConfig:
    """What every client command (``status``, ...) needs to ask a running node
    (``node.cli.ClientOptions`` makes its flags)."""

    connect: Address = field(default_factory=lambda: Address("127.0.0.1", DEFAULT_PORT))
    """HOST:PORT of the node to ask (HOST alone: the default port)."""

    data_dir: Path = field(default_factory=default_data_dir)
    """Directory whose ``mesh.key`` is used unless ``mesh_key_file`` is given."""

    mesh_key_file: Path | None = None
    """The mesh secret file; None means ``<data_dir>/mesh.key``. Never created."""

    timeout: float = 3.0
    """Seconds to wait for the answer."""

    def __post_init__(self) -> None:
        _seconds("timeout", self.timeout, 0.0, 86400.0)

    @property
    def mesh_key_path(self) -> Path:
        return self.mesh_key_file if self.mesh_key_file is not None else self.data_dir / "mesh.key"
