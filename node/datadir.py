"""A running node's data dir: its lock, its keys, and what it remembers between runs.

``DataDir(config).open()`` takes the lock (two nodes never share an identity) and loads or
creates the identity and mesh secret (``node.identity``); ``seeds()`` are the ``--join``
seeds, else the live members remembered from the last run (rejoin); ``store_peers`` and
``store_incarnation`` persist what membership reports, logging (never raising) a failure:
a full disk must not stop a running node. ``announce`` prints the join hint and writes the
ready file (``--ready-file``).
"""

from __future__ import annotations

import json
import logging
import os
import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node import identity as keys
from node.config import NodeConfig, parse_address
from node.files import atomic_write
from protocol import crypto
from protocol.errors import ConfigError

log = logging.getLogger("starmesh.node")


class DataDir:
    """The files of one node (module docstring)."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self._lock = keys.DataDirLock(config.data_dir)
        self.mesh_key_created = False

    def open(self) -> tuple[Ed25519PrivateKey, bytes]:
        """Lock the data dir; return (identity, mesh secret), creating what is missing."""
        config = self.config
        self._lock.acquire()
        try:
            key, created_identity = keys.load_or_create_identity(config.identity_path)
            secret, self.mesh_key_created = keys.load_or_create_mesh_key(config.mesh_key_path)
        except BaseException:
            self._lock.release()
            raise
        if created_identity:
            log.info("created a new node identity in %s", config.identity_path)
        if self.mesh_key_created:
            log.info("created a new mesh secret in %s (mode 0600)", config.mesh_key_path)
            if config.seeds:
                log.warning("this node has a NEW mesh secret: seeds with another secret will refuse it")
        return key, secret

    def close(self) -> None:
        self._lock.release()

    def announce(self, *, node_id: bytes, address: str, bound: str, metrics: str | None) -> None:
        """Print how other machines join this node; write the ready file if asked for."""
        key_path = self.config.mesh_key_path.resolve()
        log.info("node %s listening on %s, advertising %s", crypto.short_id(node_id), bound, address)
        print(f"starmesh node {crypto.short_id(node_id)} is up at {address}. "
              f"To join this mesh, copy {key_path} to the other machine and run:\n"
              f"  python -m node --join {address} --mesh-key-file {key_path}", flush=True)
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
            seeds = [p for p in keys.load_peers(self.config.peers_path) if _is_address(p)]
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


def _is_address(text: str) -> bool:
    try:
        parse_address(text)
    except ConfigError:
        return False
    return True
