"""``DataDir.open``: checks before writes (busy port, a joiner without its key, a damaged
identity), who may create a mesh key, the checksummed identity file, and the library never
printing the CLI's banner."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from node import identity as files
from node.config import Address, NodeConfig
from node.datadir import DataDir, check_listen, join_banner
from protocol import crypto
from protocol.errors import ConfigError


def _config(tmp_path: Path, **changes: object) -> NodeConfig:
    base: dict[str, object] = {"listen": Address("127.0.0.1", 0), "data_dir": tmp_path / "node"}
    return NodeConfig(**{**base, **changes})  # type: ignore[arg-type]


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def _open(config: NodeConfig) -> DataDir:
    data = DataDir(config)
    data.open()
    data.close()
    return data


# ---- who creates a mesh key ---------------------------------------------------------------

def test_a_new_mesh_creates_its_key_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="starmesh.node")
    config = _config(tmp_path)
    assert _open(config).mesh_key_created
    assert config.mesh_key_path.stat().st_mode & 0o777 == 0o600
    assert f"starting a new mesh: created its secret in {config.mesh_key_path}" in caplog.text
    assert not _open(config).mesh_key_created  # the second start reads it


@pytest.mark.parametrize("how", ["seeds", "remembered"])
def test_a_joiner_without_its_key_creates_nothing(tmp_path: Path, how: str) -> None:
    typo = tmp_path / "node" / "typo.key"
    config = _config(tmp_path, mesh_key_file=typo,
                     seeds=(Address("127.0.0.1", 1),) if how == "seeds" else ())
    if how == "remembered":
        config.data_dir.mkdir()
        config.peers_path.write_text("127.0.0.1:1\n")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(ConfigError) as info:
        DataDir(config).open()
    message = str(info.value)
    assert message.startswith(f"{typo}: no mesh key")
    assert f"python -m node mesh-key new {typo}" in message and f"scp FIRST-NODE:~/.starmesh/mesh.key {typo}" in message
    assert ("--join 127.0.0.1:1" if how == "seeds" else str(config.peers_path)) in message
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no key, no identity, no lock


def test_a_mistyped_key_path_points_at_the_data_dirs_key(tmp_path: Path) -> None:
    config = _config(tmp_path, mesh_key_file=tmp_path / "node" / "mesh.kye", seeds=(Address("127.0.0.1", 1),))
    files.create_mesh_key(config.data_dir / "mesh.key")
    with pytest.raises(ConfigError, match=r"did you mean --mesh-key-file .*node/mesh\.key\?"):
        DataDir(config).open()


def test_a_joiner_with_its_key_opens(tmp_path: Path) -> None:
    key = tmp_path / "mesh.key"
    secret = files.create_mesh_key(key)
    data = DataDir(_config(tmp_path, mesh_key_file=key, seeds=(Address("127.0.0.1", 1),)))
    _, got = data.open()
    data.close()
    assert got == secret and not data.mesh_key_created


# ---- a busy port fails before anything is written -----------------------------------------

def test_a_busy_port_is_refused_before_anything_is_written(tmp_path: Path, busy_port: int) -> None:
    config = _config(tmp_path, listen=Address("127.0.0.1", busy_port))
    with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{busy_port}: port {busy_port} is already in use"):
        DataDir(config).open()
    assert not config.data_dir.exists()
    with pytest.raises(ConfigError, match="already in use"):
        check_listen(Address("0.0.0.0", busy_port))  # the wildcard overlaps it too
    metrics = _config(tmp_path, metrics_listen=Address("127.0.0.1", busy_port))
    with pytest.raises(ConfigError, match=r"\(--metrics-listen\): port \d+ is already in use"):
        DataDir(metrics).open()
    assert not config.data_dir.exists()


def test_check_listen_accepts_free_and_port_zero_and_names_foreign_hosts() -> None:
    check_listen(Address("127.0.0.1", 0))
    check_listen(Address("localhost", 0))
    with pytest.raises(ConfigError, match=r"cannot listen on 192\.0\.2\.1:7400"):
        check_listen(Address("192.0.2.1", 7400))  # TEST-NET-1: not this machine's


# ---- the identity file --------------------------------------------------------------------

def test_identity_file_is_text_with_a_checksum(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    key, created = files.load_or_create_identity(path)
    text = path.read_text()
    assert created and text.startswith(f"{files.IDENTITY_PREFIX}:") and text.endswith("\n")
    assert text.strip() == files.identity_to_text(key)
    assert crypto.node_id_of(files.load_identity(path)) == crypto.node_id_of(key)


def test_every_flipped_byte_of_the_identity_is_refused_and_the_file_kept(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    files.load_or_create_identity(path)
    good = path.read_bytes()
    for i in range(len(good) - 1):  # the last byte is the newline: whitespace around is allowed
        for bit in (0x01, 0x80):
            damaged = bytearray(good)
            damaged[i] ^= bit
            path.write_bytes(bytes(damaged))
            with pytest.raises(ConfigError, match="the identity key is damaged") as info:
                files.load_or_create_identity(path)
            assert str(info.value).startswith(f"{path}:") and "refusing to start with it or to replace it" in str(info.value)
            assert path.read_bytes() == bytes(damaged)


def test_a_truncated_identity_is_refused_even_at_32_bytes(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    files.load_or_create_identity(path)
    good = path.read_bytes()
    for size in (0, 20, 32, len(good) - 3):
        path.write_bytes(good[:size])
        with pytest.raises(ConfigError, match="damaged"):
            files.load_or_create_identity(path)


def test_a_legacy_raw_identity_is_still_read(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    key = crypto.generate_identity()
    path.write_bytes(crypto.identity_to_bytes(key))
    path.chmod(0o600)
    again, created = files.load_or_create_identity(path)
    assert not created and crypto.node_id_of(again) == crypto.node_id_of(key)
    assert path.read_bytes() == crypto.identity_to_bytes(key)  # left as it was


def test_a_damaged_identity_stops_the_node_before_a_key_is_made(tmp_path: Path) -> None:
    config = _config(tmp_path)
    config.data_dir.mkdir()
    config.identity_path.write_text(f"{files.IDENTITY_PREFIX}:garbage:0\n")
    config.identity_path.chmod(0o600)
    with pytest.raises(ConfigError, match=f"{config.identity_path}: the identity key is damaged"):
        DataDir(config).open()
    assert not config.mesh_key_path.exists()


# ---- the banner ---------------------------------------------------------------------------

def test_the_library_logs_the_join_command_and_never_prints(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="starmesh.node")
    config = _config(tmp_path, ready_file=tmp_path / "ready.json")
    data = DataDir(config)
    key, _ = data.open()
    data.announce(node_id=crypto.node_id_of(key), address="127.0.0.1:7400", bound="127.0.0.1:7400", metrics=None)
    data.close()
    assert capsys.readouterr().out == ""
    command = f"python -m node --join 127.0.0.1:7400 --mesh-key-file {config.mesh_key_path.resolve()}"
    assert command in caplog.text
    banner = join_banner(config, node_id=crypto.node_id_of(key), address="127.0.0.1:7400")
    assert banner.endswith(command) and f"copy {config.mesh_key_path.resolve()}" in banner


async def test_a_node_run_by_a_program_prints_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from node.runtime import Node

    async with Node(_config(tmp_path, preset="test", use_uvloop=False)) as node:
        assert node.join_state().joined and node.mesh_key_created
    assert capsys.readouterr().out == ""
