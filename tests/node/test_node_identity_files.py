"""Data-dir files go through ``node.files.atomic_write``: whole files, keys 0600, no overwrite."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from node import identity as files
from node.files import atomic_write as real
from protocol import crypto
from protocol.errors import ConfigError


def test_keys_are_0600_whatever_the_umask_and_leave_no_temporary_files(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        files.load_or_create_identity(tmp_path / "identity.key")
        files.create_mesh_key(tmp_path / "mesh.key")
        files.store_incarnation(tmp_path / "incarnation", 3)
        files.store_peers(tmp_path / "peers", ["10.0.0.1:7400"])
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"identity.key": 0o600, "mesh.key": 0o600, "incarnation": 0o644, "peers": 0o644}


def test_a_racing_creator_keeps_its_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process creates the key between our check and our link: we do not replace it,
    and ``load_or_create`` reads the winner's key."""
    path = tmp_path / "identity.key"
    winner = crypto.generate_identity()

    def racing(target: Path, data: bytes, **kwargs: Any) -> None:
        real(target, data, **kwargs)
        if not path.exists():
            real(path, crypto.identity_to_bytes(winner), mode=0o600)

    monkeypatch.setattr(files, "atomic_write", racing)
    with pytest.raises(ConfigError, match="already exists"):
        files._write_new_secret(path, b"ours", "identity key")
    assert path.read_bytes() == crypto.identity_to_bytes(winner)
    path.unlink()
    key, created = files.load_or_create_identity(path)
    assert not created and crypto.node_id_of(key) == crypto.node_id_of(winner)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["identity.key"]


def test_an_unusable_dir_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("a file, not a dir")
    with pytest.raises(ConfigError, match="cannot write incarnation"):
        files.store_incarnation(tmp_path / "plain" / "incarnation", 1)
    with pytest.raises(ConfigError, match=r"mesh\.key: cannot create"):
        files.create_mesh_key(tmp_path / "plain" / "mesh.key")
