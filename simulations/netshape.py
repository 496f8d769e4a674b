"""Network namespaces with rate-limited links, for benchmarks of real processes.

``ShapedNet(n, rate="100mbit")`` builds, as root, ``n`` namespaces each holding one node
and a switch namespace holding a bridge; node ``i`` has ``eth0`` at ``198.18.0.(i+1)/24``
(RFC 2544's benchmarking range: never routed, and nothing lives in the root namespace) and
its veth peer is a port of the bridge. Both directions of every link are shaped with
``tc tbf``: ``eth0``'s egress (upload) inside the node's namespace, the bridge port's egress
(download) inside the switch namespace, so each node has a full-duplex link of ``rate``.

Names are unique per ``ShapedNet`` (pid and a counter), and ``close()`` (or leaving the
``with`` block) deletes every namespace, which deletes its interfaces and qdiscs with it.
``unavailable()`` tells, without changing anything, why shaping cannot run here.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from types import TracebackType

_counter = itertools.count()

#: ``100mbit``, ``1gbit``, ``500kbit``: what ``tc`` accepts and we can convert to bytes/s.
_RATE = re.compile(r"^(\d+(?:\.\d+)?)(kbit|mbit|gbit)$")
_UNITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}

#: Smallest tbf bucket: above a 64 KiB GSO segment, or tbf drops whole segments.
MIN_BURST_BYTES = 256 * 1024


def rate_bytes_per_s(rate: str) -> float:
    """``"100mbit"`` -> 12.5e6 bytes per second. ``ValueError`` on anything else."""
    m = _RATE.match(rate.strip().lower())
    if m is None:
        raise ValueError(f"rate {rate!r}: expected e.g. 100mbit or 1gbit")
    return float(m.group(1)) * _UNITS[m.group(2)] / 8.0


def unavailable() -> str | None:
    """Why shaped namespaces cannot be built here (None: they can)."""
    if os.name != "posix" or os.geteuid() != 0:
        return "needs root (ip netns, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs the {tool!r} tool (iproute2)"
    name = f"smprobe{os.getpid()}"
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"ip netns does not work here: {probe.stderr.strip() or probe.returncode}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


class ShapedNet:
    """``n`` namespaces on one bridge, every link shaped to ``rate`` (see module docstring)."""

    def __init__(self, n: int, *, rate: str | None, subnet: str = "198.18.0") -> None:
        if not 1 <= n <= 200:
            raise ValueError("ShapedNet supports 1..200 nodes")
        self.n = n
        self.rate = rate
        self.bytes_per_s = rate_bytes_per_s(rate) if rate else None
        self.prefix = f"sm{os.getpid() % 100000}x{next(_counter)}"
        self.switch = f"{self.prefix}sw"
        self.namespaces = [f"{self.prefix}n{i}" for i in range(n)]
        self.addresses = [f"{subnet}.{i + 1}" for i in range(n)]
        self._created: list[str] = []

    def __enter__(self) -> ShapedNet:
        try:
            self.create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def create(self) -> None:
        self._netns_add(self.switch)
        self._ip(self.switch, "link", "add", "br0", "type", "bridge")
        self._ip(self.switch, "link", "set", "br0", "up")
        for i, ns in enumerate(self.namespaces):
            self._netns_add(ns)
            port = f"p{i}"
            self._ip(ns, "link", "set", "lo", "up")
            self._ip(ns, "link", "add", "eth0", "type", "veth", "peer", "name", port,
                     "netns", self.switch)
            self._ip(self.switch, "link", "set", port, "master", "br0")
            self._ip(self.switch, "link", "set", port, "up")
            self._ip(ns, "addr", "add", f"{self.addresses[i]}/24", "dev", "eth0")
            self._ip(ns, "link", "set", "eth0", "up")
            if self.rate:
                self._shape(ns, "eth0")
                self._shape(self.switch, port)

    def _shape(self, ns: str, dev: str) -> None:
        assert self.bytes_per_s is not None and self.rate is not None
        burst = max(MIN_BURST_BYTES, int(self.bytes_per_s * 0.004))
        _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
              "rate", self.rate, "burst", str(burst), "latency", "100ms"])

    def _netns_add(self, ns: str) -> None:
        _run(["ip", "netns", "add", ns])
        self._created.append(ns)

    @staticmethod
    def _ip(ns: str, *args: str) -> None:
        _run(["ip", "-n", ns, *args])

    def wrap(self, i: int, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside node ``i``'s namespace."""
        return ["ip", "netns", "exec", self.namespaces[i], *argv]

    def close(self) -> None:
        """Delete every namespace this object created (idempotent, never raises)."""
        for ns in reversed(self._created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._created.clear()


def _run(argv: list[str]) -> None:
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {out.stderr.strip() or out.returncode}")
