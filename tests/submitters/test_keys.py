"""Submitter key files and text forms, the default path, and the mesh key file's owner line."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from node import submitters_cli
from node.config import Address, NodeConfig
from node.datadir import DataDir
from node.identity import (
    create_mesh_key,
    load_mesh_key,
    load_mesh_owner,
    load_or_create_mesh_key,
    set_mesh_owner,
)
from node.submitters.keys import (
    owner_line,
    parse_owner_line,
    parse_public_key,
    public_key_of,
    public_key_to_text,
    submitter_key_from_text,
    submitter_key_to_text,
)
from node.submitters.store import (
    default_key_path,
    load_or_create_submitter_key,
    load_submitter_key,
)
from protocol import crypto
from protocol.errors import ConfigError

ZERO = crypto.identity_from_bytes(bytes(32))


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_text_forms_roundtrip_with_a_check() -> None:
    text = submitter_key_to_text(ZERO)
    assert text == "starmesh-submitter-v1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA:" + text[-16:]
    assert len(text.split(":")[2]) == 16
    assert public_key_of(submitter_key_from_text(f"  {text}\n".encode())) == public_key_of(ZERO)
    pub = public_key_of(ZERO)
    shown = public_key_to_text(pub)
    assert shown.startswith("ed25519:") and len(shown) == 8 + 43
    assert parse_public_key(shown) == pub and parse_public_key(pub.hex()) == pub
    assert parse_public_key(pub.hex().upper()) == pub
    assert parse_owner_line(owner_line(pub)) == pub and owner_line(pub) == f"owner {shown}"


@pytest.mark.parametrize("bad", [
    b"", b"garbage", b"\xff", b"starmesh-identity-v1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA:0000000000000000",
    b"starmesh-submitter-v1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA:0000000000000000",  # check
    b"starmesh-submitter-v1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAB:0000000000000000",  # non-canonical
    b"starmesh-submitter-v1:AAAA:0000000000000000",
])
def test_bad_key_text_is_refused(bad: bytes) -> None:
    with pytest.raises(ConfigError):
        submitter_key_from_text(bad)


def test_a_flipped_seed_character_fails_the_check() -> None:
    text = submitter_key_to_text(crypto.generate_identity())
    prefix, b64, check = text.split(":")
    flipped = ("B" if b64[0] != "B" else "C") + b64[1:]
    with pytest.raises(ConfigError, match="checksum mismatch"):
        submitter_key_from_text(f"{prefix}:{flipped}:{check}".encode())


@pytest.mark.parametrize("bad", ["", "ed25519:", "ed25519:abc", "00" * 31, "zz" * 32, "ed25519:" + "A" * 44,
                                 "ssh-ed25519 AAAA"])
def test_bad_public_keys_are_refused_with_the_forms(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_public_key(bad)
    with pytest.raises(ConfigError, match="second line"):
        parse_owner_line(f"owners {public_key_to_text(bytes(32))}")


def test_default_path_env_then_xdg_then_home() -> None:
    assert default_key_path({"STARMESH_SUBMITTER_KEY": "/k/me.key", "XDG_CONFIG_HOME": "/x"}) == Path("/k/me.key")
    assert default_key_path({"XDG_CONFIG_HOME": "/x"}) == Path("/x/starmesh/submitter.key")
    assert default_key_path({"HOME": "/h", "XDG_CONFIG_HOME": ""}) == Path("/h/.config/starmesh/submitter.key")
    assert default_key_path({"HOME": "/h", "STARMESH_SUBMITTER_KEY": " "}) == Path("/h/.config/starmesh/submitter.key")


def test_made_on_first_use_0600_then_read(tmp_path: Path) -> None:
    path = tmp_path / "cfg" / "starmesh" / "submitter.key"
    old = os.umask(0)
    try:
        key = load_or_create_submitter_key(path)
    finally:
        os.umask(old)
    assert _mode(path) == 0o600 and _mode(path.parent) == 0o700
    assert path.read_text().startswith("starmesh-submitter-v1:") and path.read_text().endswith("\n")
    assert public_key_of(load_or_create_submitter_key(path)) == public_key_of(key)
    assert public_key_of(load_submitter_key(path)) == public_key_of(key)
    assert sorted(p.name for p in path.parent.iterdir()) == ["submitter.key"]


def test_unusable_key_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "submitter.key"
    with pytest.raises(ConfigError, match="cannot read submitter key"):
        load_submitter_key(path)
    load_or_create_submitter_key(path)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_submitter_key(path)
    path.chmod(0o600)
    path.write_text("starmesh-submitter-v1:nope:0\n")
    with pytest.raises(ConfigError, match="damaged"):
        load_or_create_submitter_key(path)  # never replaced


# ---- the mesh key file's owner line --------------------------------------------------------


def test_old_one_line_files_stay_valid_with_no_owner(tmp_path: Path) -> None:
    path = tmp_path / "mesh.key"
    secret = create_mesh_key(path)
    assert len(path.read_text().splitlines()) == 1
    assert load_mesh_key(path) == secret and load_mesh_owner(path) is None


def test_the_owner_line(tmp_path: Path) -> None:
    owner = public_key_of(ZERO)
    path = tmp_path / "mesh.key"
    secret = create_mesh_key(path, owner)
    lines = path.read_text().splitlines()
    assert lines[0] == crypto.mesh_secret_to_text(secret) and lines[1] == f"owner {public_key_to_text(owner)}"
    assert load_mesh_key(path) == secret and load_mesh_owner(path) == owner and _mode(path) == 0o600
    other = bytes([5]) * 32
    set_mesh_owner(path, other)
    assert load_mesh_key(path) == secret and load_mesh_owner(path) == other and _mode(path) == 0o600
    fresh, created = load_or_create_mesh_key(tmp_path / "new.key", owner=owner)
    assert created and load_mesh_owner(tmp_path / "new.key") == owner and fresh != secret


@pytest.mark.parametrize("second", ["owner nope", "owner ed25519:AAAA", "garbage", "owner x\nowner y"])
def test_a_bad_owner_line_is_refused(tmp_path: Path, second: str) -> None:
    path = tmp_path / "mesh.key"
    secret = create_mesh_key(path)
    path.write_text(f"{crypto.mesh_secret_to_text(secret)}\n{second}\n")
    with pytest.raises(ConfigError, match="not a mesh key"):
        load_mesh_key(path)


def _config(tmp_path: Path) -> NodeConfig:
    return NodeConfig(data_dir=tmp_path / "node", listen=Address("127.0.0.1", 0))


def test_a_new_mesh_is_owned_by_the_default_submitter_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    key_path = tmp_path / "me" / "submitter.key"
    monkeypatch.setenv("STARMESH_SUBMITTER_KEY", str(key_path))
    config = _config(tmp_path)
    data = DataDir(config)
    with caplog.at_level(logging.INFO, logger="starmesh.node"):
        data.open()
    data.close()
    owner = public_key_of(load_submitter_key(key_path))
    assert data.mesh_owner == owner and load_mesh_owner(config.mesh_key_path) == owner
    assert "created your submitter key" in caplog.text and public_key_to_text(owner) in caplog.text
    assert not any(p.name == "submitter.key" for p in config.data_dir.iterdir())
    again = DataDir(config)  # a restart reads the owner, makes nothing
    again.open()
    again.close()
    assert again.mesh_owner == owner and not again.mesh_key_created


def test_the_submitter_key_never_goes_in_the_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(tmp_path)
    monkeypatch.setenv("STARMESH_SUBMITTER_KEY", str(config.data_dir / "submitter.key"))
    with pytest.raises(ConfigError, match="inside the node's data dir"):
        DataDir(config).open()
    assert not config.mesh_key_path.exists()


def test_mesh_key_new_and_set_owner_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    me = tmp_path / "me.key"
    assert submitters_cli.mesh_key_main(["new", str(tmp_path / "a.key"), "--key", str(me)]) == 0
    mine = public_key_of(load_submitter_key(me))
    assert load_mesh_owner(tmp_path / "a.key") == mine and "owned by" in capsys.readouterr().out
    old = tmp_path / "old.key"
    secret = create_mesh_key(old)
    assert submitters_cli.mesh_key_main(["set-owner", str(old), "--key", str(me)]) == 0
    assert load_mesh_owner(old) == mine and load_mesh_key(old) == secret
    assert "was no owner" in capsys.readouterr().out
    other = public_key_to_text(bytes([4]) * 32)
    assert submitters_cli.mesh_key_main(["set-owner", str(old), "--owner", other]) == 0
    assert load_mesh_owner(old) == bytes([4]) * 32
    assert submitters_cli.mesh_key_main(["new", str(old)]) == 2  # never overwritten
    assert "already exists" in capsys.readouterr().err


def test_key_command_prints_the_public_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "k" / "submitter.key"
    assert submitters_cli.main(["key", "--key", str(path)]) == 0
    out = capsys.readouterr()
    pub = public_key_to_text(public_key_of(load_submitter_key(path)))
    assert out.out.strip() == pub and "created your submitter key" in out.err and "submitters add" in out.err
    assert submitters_cli.main(["key", "--key", str(path)]) == 0
    assert capsys.readouterr().out.strip() == pub
    assert submitters_cli.main(["add", "not-a-key", "--key", str(path)]) == 2
    assert "not a public key" in capsys.readouterr().err
