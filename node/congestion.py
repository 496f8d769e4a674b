"""TCP congestion control of BULK links (``--bulk-congestion``).

Tensor rounds start N-1 bulk flows per node at once, and every flow crosses two bottlenecks
(the sender's uplink and the receiver's downlink). The congestion controller decides how
well those flows fill the links, and the right one depends on the links: measured on this
project's shaped network namespaces (``python -m simulations bench allreduce --shape
100mbit``, tbf with a 100 ms drop-tail queue, no propagation delay), four nodes reached
94-95% of the link optimum with ``cubic`` and 81-90% with ``bbr``, whose flows into one
receiver sometimes settle for seconds below their share while every sender has room: with
no propagation delay bbr's min RTT is 0.02-0.06 ms while the shared queues make the real
RTT 20-50 ms, and its window (about twice bandwidth x min RTT) starves those flows. On real,
long or lossy paths that does not happen and bbr is often the better choice. So the node leaves the system default alone
unless told (``NodeConfig.links.bulk_congestion``), and then sets the named algorithm on each
BULK socket only: gossip and status links keep the system default.

Linux only (``TCP_CONGESTION``). ``check`` runs when the node starts, so a name the kernel
does not offer, or one an unprivileged process may not pick
(``/proc/sys/net/ipv4/tcp_allowed_congestion_control``), is a ``ConfigError`` at startup
instead of a warning per connection.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from node.config import validate_congestion_name
from protocol.errors import ConfigError

log = logging.getLogger(__name__)

#: ``TCP_CA_NAME_MAX`` is 16 bytes including the terminating NUL.

#: Where Linux lists the algorithms it has.
AVAILABLE_PATH = "/proc/sys/net/ipv4/tcp_available_congestion_control"


validate_name = validate_congestion_name
"""``name`` if it can be an algorithm's name, else ``ConfigError`` (``node.config``)."""


def available() -> list[str]:
    """The algorithms this kernel offers (empty where it does not say)."""
    try:
        with open(AVAILABLE_PATH, encoding="ascii") as f:
            return f.read().split()
    except OSError:
        return []


def check(name: str) -> None:
    """Raise ``ConfigError`` unless sockets of this process can use ``name``."""
    validate_name(name)
    if not hasattr(socket, "TCP_CONGESTION"):
        raise ConfigError("choosing a TCP congestion control needs Linux (TCP_CONGESTION)")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            apply(probe, name)
        except OSError as exc:
            offered = ", ".join(available()) or "unknown"
            raise ConfigError(f"congestion control {name!r} cannot be used here ({exc.strerror}); "
                              f"the kernel offers: {offered}") from exc


def apply(sock: Any, name: str) -> None:
    """Set ``name`` on a TCP socket (``OSError`` if the kernel refuses)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name.encode("ascii"))


def current(sock: Any) -> str:
    """The algorithm a TCP socket uses now."""
    raw: bytes = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
    return raw.split(b"\0", 1)[0].decode("ascii")


def system_default() -> str:
    """The algorithm a new TCP socket of this process gets ("unknown" where the platform
    does not say)."""
    if not hasattr(socket, "TCP_CONGESTION"):
        return "unknown"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        return current(probe)


def apply_to_transport(transport: Any, name: str) -> None:
    """Set ``name`` on a transport's socket; a refusal is logged, never raised (``check``
    already ran at startup, so this only happens if the system changed since)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    try:
        apply(sock, name)
    except OSError as exc:
        log.warning("cannot set congestion control %s on a bulk link: %s", name, exc)
