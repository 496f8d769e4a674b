"""A running node's data dir: its lock, its keys, and what it remembers between runs.

``DataDir(config).open()`` first checks what would stop the node from starting, and only
then writes anything: the listen address must be free (``check_listen``), a joining node
must already hold the mesh key, and existing key files must be sound. It then takes the
lock (two nodes never share an identity) and loads or creates the identity and mesh secret
(``node.identity``). Only a node starting a *new* mesh (no ``--join`` seeds and no peers
remembered from an earlier run) creates a mesh secret, and it logs that it did: a joiner
that made up its own key would be refused by every member and retry forever. The new key
file names the mesh owner: the public key of the person's submitter key
(``node.submitters.store``), made on first use, so whoever starts a mesh may submit to it.

``seeds()`` are the ``--join`` seeds, else the live members remembered from the last run
(rejoin); ``store_peers`` and ``store_incarnation`` persist what membership reports,
logging (never raising) a failure: a full disk must not stop a running node. ``announce``
logs how to join this node and writes the ready file (``--ready-file``); the command line
prints ``join_banner`` on stdout, the library never does (a user program owns its stdout).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node import identity as keys
from node.config import Address, NodeConfig, parse_address
from node.files import atomic_write
from node.submitters.keys import public_key_of, public_key_to_text
from node.submitters.store import KEY_ENV, default_key_path, load_or_create_submitter_key
from protocol import crypto
from protocol.errors import ConfigError

log = logging.getLogger("starmesh.node")


class DataDir:
    """The files of one node (module docstring)."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self._lock = keys.DataDirLock(config.data_dir)
        self._remembered: list[str] | None = None
        self.mesh_key_created = False
        self.mesh_owner: bytes | None = None
        """The mesh owner named in the mesh key file (after ``open``); None: nobody may submit."""

    def open(self) -> tuple[Ed25519PrivateKey, bytes]:
        """Check, lock, then return (identity, mesh secret), creating what may be created."""
        config = self.config
        check_listen(config.listen)
        if config.metrics_listen is not None:
            check_listen(config.metrics_listen, what="--metrics-listen")
        joining = self.joining_reason()
        if joining is not None and not config.mesh_key_path.exists():
            raise ConfigError(missing_key_message(config, joining))
        self._lock.acquire()
        try:
            key, secret, created_identity = self._load_or_create(joining)
        except BaseException:
            self._lock.release()
            raise
        if created_identity:
            log.info("created a new node identity in %s", config.identity_path)
        if self.mesh_key_created:
            log.info("starting a new mesh: created its secret in %s (mode 0600); every node "
                     "that joins needs a copy of this file", config.mesh_key_path)
        return key, secret

    def _load_or_create(self, joining: str | None) -> tuple[Ed25519PrivateKey, bytes, bool]:
        """Read what exists (refusing damaged files) before creating what is missing."""
        id_path, key_path = self.config.identity_path, self.config.mesh_key_path
        key = keys.load_identity(id_path) if id_path.exists() else None
        if key_path.exists() or joining is not None:
            secret = keys.load_mesh_key(key_path)  # a joiner's key vanished: "cannot read"
        else:
            owner = self._new_mesh_owner()
            secret, self.mesh_key_created = keys.load_or_create_mesh_key(key_path, owner=owner)
        self.mesh_owner = keys.load_mesh_owner(key_path)
        if key is not None:
            return key, secret, False
        key, created = keys.load_or_create_identity(id_path)
        return key, secret, created

    def _new_mesh_owner(self) -> bytes:
        """The owner of a mesh this node creates: the public key of the person's default
        submitter key (``node.submitters.store.default_key_path``, made if missing), so they
        can submit from this machine at once. Its private key stays out of the data dir."""
        path = default_key_path()
        data_dir = self.config.data_dir.resolve()
        if path.resolve().is_relative_to(data_dir):
            raise ConfigError(
                f"{path}: the submitter key (${KEY_ENV}) is inside the node's data dir "
                f"{data_dir}; it is a person's key, not a node's: keep it elsewhere")
        created = not path.exists()
        owner = public_key_of(load_or_create_submitter_key(path))
        if created:
            log.info("created your submitter key in %s (mode 0600): it owns the new mesh", path)
        log.info("the new mesh's owner is %s (%s): it may submit work and grant others "
                 "(python -m node submitters add)", public_key_to_text(owner), path)
        return owner

    def joining_reason(self) -> str | None:
        """Why this node joins an existing mesh (``--join ...``, remembered peers), or None
        when it starts a new one."""
        if self.config.seeds:
            return "--join " + " --join ".join(str(s) for s in self.config.seeds)
        if self.remembered_peers():
            return f"it remembers the peers of an earlier run in {self.config.peers_path}"
        return None

    def remembered_peers(self) -> list[str]:
        """The valid addresses in ``<data_dir>/peers`` (read once)."""
        if self._remembered is None:
            self._remembered = [p for p in keys.load_peers(self.config.peers_path) if _is_address(p)]
        return self._remembered

    def close(self) -> None:
        self._lock.release()

    def announce(self, *, node_id: bytes, address: str, bound: str, metrics: str | None) -> None:
        """Log how other machines join this node; write the ready file if asked for."""
        log.info("node %s listening on %s, advertising %s; to join it: %s", crypto.short_id(node_id),
                 bound, address, join_command(self.config, address=address))
        if self.config.ready_file is not None:
            atomic_write(self.config.ready_file, json.dumps({
                "address": address, "listen": bound, "node_id": node_id.hex(), "pid": os.getpid(),
                "ready_at": time.time(), "metrics": metrics}), what="ready file", fsync=False)

    def last_incarnation(self) -> int:
        return keys.load_incarnation(self.config.incarnation_path)

    def seeds(self, *, own_address: str) -> list[str]:
        """``--join`` seeds, else the live members remembered from the last run."""
        seeds = [str(s) for s in self.config.seeds]
        if not seeds:
            seeds = self.remembered_peers()
            if seeds:
                log.info("rejoining through %d peers remembered in %s", len(seeds), self.config.peers_path)
        return [s for s in seeds if s != own_address]

    def store_peers(self, addresses: list[str]) -> None:
        try:
            keys.store_peers(self.config.peers_path, addresses)
        except ConfigError as exc:
            log.error("%s", exc)

    def store_incarnation(self, incarnation: int) -> None:
        try:
            keys.store_incarnation(self.config.incarnation_path, incarnation)
        except ConfigError as exc:
            log.error("%s", exc)


def join_command(config: NodeConfig, *, address: str) -> str:
    """The command another machine runs to join the node advertising ``address``."""
    return f"python -m node --join {address} --mesh-key-file {config.mesh_key_path.resolve()}"


def join_banner(config: NodeConfig, *, node_id: bytes, address: str) -> str:
    """What ``python -m node`` prints on stdout once the node is up (two lines)."""
    return (f"starmesh node {crypto.short_id(node_id)} is up at {address}. To join this mesh, copy "
            f"{config.mesh_key_path.resolve()} to the other machine and run:\n"
            f"  {join_command(config, address=address)}")


def missing_key_message(config: NodeConfig, joining: str) -> str:
    """The error of a joining node without its mesh key: the path, and how to get one."""
    path = config.mesh_key_path
    lines = [
        f"{path}: no mesh key. This node joins an existing mesh ({joining}), so it needs that "
        "mesh's key and does not make one up (every member would refuse it). Copy the key "
        "from a member (the first node's start-up line names its file), e.g.",
        f"  scp FIRST-NODE:~/.starmesh/mesh.key {path}",
        "or create the key of a new mesh and copy it to every node:",
        f"  python -m node mesh-key new {path}",
    ]
    default = config.data_dir / "mesh.key"
    if config.mesh_key_file is not None and path != default and default.exists():
        lines.append(f"({default} exists: did you mean --mesh-key-file {default}?)")
    return "\n".join(lines)


def check_listen(address: Address, *, what: str = "--listen") -> None:
    """``ConfigError`` unless ``address`` can be bound now: a port in use (another node) or
    a host that is not this machine's is reported before the node writes anything. The
    probe socket is closed at once and the pool binds for real right after, so a process
    that grabs the port in between only gets the same error from the pool."""
    host = address.host or None
    where = f"{address}" if what == "--listen" else f"{address} ({what})"
    try:
        infos = socket.getaddrinfo(host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"cannot listen on {where}: cannot resolve {address.host!r}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the pool binds
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ConfigError(
                        f"cannot listen on {where}: port {address.port} is already in use "
                        "(another node or program listens there): stop it, or give this node "
                        f"another {what} port (port 0 picks a free one)") from None
                raise ConfigError(f"cannot listen on {where}: {exc.strerror or exc}") from None


def _is_address(text: str) -> bool:
    try:
        parse_address(text)
    except ConfigError:
        return False
    return True

