"""The node's one frozen configuration, and the parsing of addresses it is made of.

Everything a user may set is a field here with a flag and a ``STARMESH_*`` environment
variable (the table ``OPTIONS`` in ``node/cli.py`` binds the three together). Invalid
values raise ``ConfigError`` with a message that names the setting.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from node import congestion
from protocol.errors import ConfigError

DEFAULT_PORT = 7400

#: SWIM timing presets a node can run with (``discovery.config.SwimConfig`` constructors).
PRESETS = ("lan", "wan", "local", "test")

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


def guess_local_ip() -> str:
    """Best guess of this host's outward-facing IP (no packet is sent); loopback if none."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1: routing decision only
        ip: str = probe.getsockname()[0]
    except OSError:
        ip = "127.0.0.1"
    finally:
        probe.close()
    return ip


def default_data_dir() -> Path:
    return Path("~/.starmesh").expanduser()


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    """How one node runs. Build it with ``NodeConfig(...)`` or from the CLI (``node/cli.py``)."""

    listen: Address = field(default_factory=lambda: Address("0.0.0.0", DEFAULT_PORT))
    """Where to accept TCP connections. Port 0 picks a free port (see ``ready_file``)."""

    advertise: Address | None = None
    """The address peers dial to reach us. None: the listen address, except that a wildcard
    host is replaced by ``guess_local_ip()`` (loopback when listening on loopback); a port of
    0 is replaced by the port actually bound."""

    data_dir: Path = field(default_factory=default_data_dir)
    """Holds ``identity.key`` (Ed25519, 0600), ``incarnation`` and, by default, ``mesh.key``."""

    seeds: tuple[Address, ...] = ()
    """Members to join through (push/pull with the first that answers). Empty: the live
    members remembered in ``<data_dir>/peers`` from the last run, if any, else a new mesh."""

    mesh_key_file: Path | None = None
    """The mesh secret file; None means ``<data_dir>/mesh.key``. Created (0600) if missing."""

    preset: str = "lan"
    """SWIM timing preset: ``lan``, ``wan``, ``local`` (one host) or ``test`` (fast, for tests)."""

    log_level: str = "INFO"
    """Lowest log level printed to stderr: DEBUG, INFO, WARNING or ERROR."""

    ready_file: Path | None = None
    """If set, written once listening and joining: JSON ``{"address", "listen", "node_id", "pid",
    "ready_at"}`` (``ready_at``: Unix time, for benchmarks measuring from that moment)."""

    handshake_timeout: float = 5.0
    """Seconds a connection may take to finish its handshake before it is closed."""

    dial_timeout: float = 2.0
    """Seconds a TCP connect to a peer may take before the peer counts as unreachable."""

    leave_timeout: float = 1.0
    """Seconds spent, on shutdown, flushing our leave announcement before closing sockets."""

    max_connections: int = 512
    """Most open connections (inbound and outbound); further inbound ones are refused."""

    max_handshaking: int = 64
    """Most inbound connections still in their handshake; further ones are refused."""

    inbox_messages: int = 64
    """Messages buffered per connection before reading from it is paused (backpressure)."""

    write_buffer_bytes: int = 8 * 1024 * 1024
    """Per-connection write buffer above which best-effort gossip is dropped and senders wait."""

    idle_timeout: float = 300.0
    """Seconds a connection to a peer (or a status client) may carry no bytes in either
    direction, with nothing left to write, before it is closed with a goodbye; it is dialed
    again when next needed. 0 disables idle closing."""

    bulk_congestion: str | None = None
    """TCP congestion control of BULK (tensor) links, e.g. ``cubic`` or ``bbr``; None
    keeps the system default. Checked when the node starts (``node.congestion``)."""

    use_uvloop: bool = True
    """Run on uvloop when it is installed."""

    seed: int | None = None
    """Seed of the node's ``random.Random`` (probe order, jitter). None: from the OS."""

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"preset {self.preset!r}: expected one of {', '.join(PRESETS)}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ConfigError(f"log level {self.log_level!r}: expected one of {', '.join(LOG_LEVELS)}")
        for name in ("handshake_timeout", "dial_timeout", "leave_timeout"):
            value = getattr(self, name)
            if not 0.0 < value <= 600.0:
                raise ConfigError(f"{name.replace('_', ' ')} {value!r}: expected seconds in (0, 600]")
        if not 0.0 <= self.idle_timeout <= 86400.0:
            raise ConfigError(f"idle timeout {self.idle_timeout!r}: expected seconds in [0, 86400] (0: off)")
        for name in ("max_connections", "max_handshaking", "inbox_messages", "write_buffer_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', ' ')} must be >= 1")
        if self.bulk_congestion is not None:
            congestion.validate_name(self.bulk_congestion)
        if self.advertise is not None and (self.advertise.is_unspecified or self.advertise.port == 0):
            raise ConfigError(f"advertise address {self.advertise}: needs a concrete host and port")

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

    def advertise_for(self, bound: Address) -> Address:
        """The address to advertise once the listener is bound to ``bound``."""
        if self.advertise is not None:
            return self.advertise
        host = self.listen.host
        if self.listen.is_unspecified:
            host = guess_local_ip()
        elif host == "localhost":
            host = "127.0.0.1"
        return Address(host, bound.port)


def env_default(name: str, fallback: str | None = None) -> str | None:
    """The value of ``STARMESH_<name>`` if set and non-empty, else ``fallback``."""
    value = os.environ.get(f"STARMESH_{name}", "")
    return value if value.strip() else fallback
