"""Data-dir files (identity, mesh key, incarnation, lock), resource parsing, status rendering."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from discovery.members import MemberView
from node import identity as files
from node.resources import basic_meta, parse_nvidia_smi, torch_versions
from node.status import build_status_reply, reply_to_json
from protocol import crypto
from protocol.errors import ConfigError
from protocol.messages.gossip import GpuInfo, MemberStatus, NodeMeta


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_identity_created_0600_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "dir" / "identity.key"
    key, created = files.load_or_create_identity(path)
    assert created and _mode(path) == 0o600
    again, created_again = files.load_or_create_identity(path)
    assert not created_again
    assert crypto.node_id_of(again) == crypto.node_id_of(key)


def test_identity_garbage_and_open_permissions_rejected(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    path.write_bytes(b"not a key")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="the identity key is damaged"):
        files.load_or_create_identity(path)
    files.load_or_create_identity(tmp_path / "ok.key")
    (tmp_path / "ok.key").chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        files.load_or_create_identity(tmp_path / "ok.key")


def test_identity_directory_rejected(tmp_path: Path) -> None:
    (tmp_path / "identity.key").mkdir()
    with pytest.raises(ConfigError, match="not a regular file"):
        files.load_or_create_identity(tmp_path / "identity.key")


def test_mesh_key_create_load_and_refuse_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "mesh.key"
    secret = files.create_mesh_key(path)
    assert _mode(path) == 0o600 and len(secret) == 32
    assert files.load_mesh_key(path) == secret
    assert files.load_or_create_mesh_key(path) == (secret, False)
    with pytest.raises(ConfigError, match="already exists"):
        files.create_mesh_key(path)
    fresh, created = files.load_or_create_mesh_key(tmp_path / "new.key")
    assert created and fresh != secret


@pytest.mark.parametrize("content", [b"", b"garbage\n", b"\xff\xfe\x00", b"x" * 5000])
def test_mesh_key_garbage_rejected(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "mesh.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, content)
    os.close(fd)
    with pytest.raises(ConfigError):
        files.load_mesh_key(path)


def test_mesh_key_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        files.load_mesh_key(tmp_path / "nope.key")


def test_incarnation_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "incarnation"
    assert files.load_incarnation(path) == 0
    files.store_incarnation(path, 41)
    assert files.load_incarnation(path) == 41
    files.store_incarnation(path, 42)
    assert files.load_incarnation(path) == 42
    path.write_text("-3\n")
    with pytest.raises(ConfigError):
        files.load_incarnation(path)


def test_data_dir_lock_is_exclusive(tmp_path: Path) -> None:
    first, second = files.DataDirLock(tmp_path), files.DataDirLock(tmp_path)
    first.acquire()
    with pytest.raises(ConfigError, match="another node"):
        second.acquire()
    first.release()
    second.acquire()
    second.release()


def test_parse_nvidia_smi() -> None:
    text = "NVIDIA H100 80GB HBM3, 81559\nNVIDIA A10, 23028\n\ngarbage line\n, 12\nX, n/a\n"
    assert parse_nvidia_smi(text) == (
        GpuInfo(name="NVIDIA H100 80GB HBM3", memory_bytes=81559 * 2**20),
        GpuInfo(name="NVIDIA A10", memory_bytes=23028 * 2**20),
    )
    assert parse_nvidia_smi("") == ()


def test_basic_meta_and_torch_version_without_import() -> None:
    import sys

    meta = basic_meta()
    assert meta.cpus >= 1 and meta.memory_bytes > 0
    had_torch = "torch" in sys.modules
    version, _cuda = torch_versions()
    assert version.startswith("2.")  # the dev venv has torch installed
    assert ("torch" in sys.modules) == had_torch


def _view(n: int, status: MemberStatus, heard: float) -> MemberView:
    meta = NodeMeta(cpus=4, memory_bytes=2**33, gpus=(GpuInfo(name="G", memory_bytes=2**30),),
                    torch_version="2.3.0", cuda_version="12.1")
    return MemberView(node_id=bytes([n]) * 32, address=f"127.0.0.1:{7400 + n}", status=status,
                      incarnation=n, meta=meta, last_heard=heard)


def test_status_reply_and_json() -> None:
    views = [_view(1, MemberStatus.ALIVE, 99.0), _view(2, MemberStatus.SUSPECT, 97.5),
             _view(3, MemberStatus.LEFT, 90.0)]
    reply = build_status_reply(views, self_id=bytes([1]) * 32, now=100.0, uptime_s=12.0)
    data = json.loads(json.dumps(reply_to_json(reply)))
    assert data["self"]["id"] == (bytes([1]) * 32).hex() and data["self"]["last_heard_s"] == 0.0
    assert data["uptime_s"] == 12.0
    assert [(m["short_id"], m["state"], m["incarnation"], m["last_heard_s"]) for m in data["members"]] == [
        ("01" * 5, "alive", 1, 0.0), ("02" * 5, "suspect", 2, 2.5), ("03" * 5, "left", 3, 10.0)]
    member = data["members"][1]
    assert member["address"] == "127.0.0.1:7402"
    assert (member["cpus"], member["memory_bytes"], member["torch_version"], member["cuda_version"]) == (
        4, 2**33, "2.3.0", "12.1")
    assert member["gpus"] == [{"name": "G", "memory_bytes": 2**30}]


def test_peers_roundtrip_and_bounds(tmp_path: Path) -> None:
    path = tmp_path / "peers"
    assert files.load_peers(path) == []
    files.store_peers(path, ["127.0.0.1:7401", "10.0.0.2:7400"])
    assert files.load_peers(path) == ["127.0.0.1:7401", "10.0.0.2:7400"]
    files.store_peers(path, [f"10.0.0.{i}:7400" for i in range(100)])
    assert len(files.load_peers(path)) == files.MAX_PEERS
    path.write_bytes(b"\xff\xfe garbage\n\n  10.0.0.9:1  \n")
    assert files.load_peers(path) == ["\ufffd\ufffd garbage", "10.0.0.9:1"]  # the caller validates
