"""NodeConfig, address parsing and the CLI's flag/env/default resolution (no sockets)."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.cli import build_run_parser, build_status_parser, config_from_args, main
from node.config import Address, NodeConfig, parse_address
from protocol.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.5:7400", Address("10.0.0.5", 7400)),
        ("  host-a.example:1 ", Address("host-a.example", 1)),
        ("[::1]:7400", Address("::1", 7400)),
        ("127.0.0.1:0", Address("127.0.0.1", 0)),
    ],
)
def test_parse_address_accepts(text: str, expected: Address) -> None:
    assert parse_address(text) == expected


def test_parse_address_default_port_and_str() -> None:
    assert parse_address("10.0.0.5", default_port=7400) == Address("10.0.0.5", 7400)
    assert str(Address("::1", 7)) == "[::1]:7"
    assert str(Address("10.0.0.5", 7400)) == "10.0.0.5:7400"


@pytest.mark.parametrize(
    "text",
    ["", "10.0.0.5", ":7400", "host:port", "host:70000", "::1:7400", "[::1]7400", "a b:1", "h:-1"],
)
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_address(text)


def test_address_kinds() -> None:
    assert Address("0.0.0.0", 1).is_unspecified and Address("::", 1).is_unspecified
    assert Address("127.0.0.1", 1).is_loopback and Address("localhost", 1).is_loopback
    assert not Address("10.0.0.1", 1).is_loopback


def test_advertise_rules(tmp_path: Path) -> None:
    loop = NodeConfig(listen=Address("127.0.0.1", 0), data_dir=tmp_path)
    assert loop.advertise_for(Address("127.0.0.1", 5555)) == Address("127.0.0.1", 5555)
    local = NodeConfig(listen=Address("localhost", 7400), data_dir=tmp_path)
    assert local.advertise_for(Address("127.0.0.1", 7400)) == Address("127.0.0.1", 7400)
    wild = NodeConfig(listen=Address("0.0.0.0", 7400), data_dir=tmp_path)
    guessed = wild.advertise_for(Address("0.0.0.0", 7400))
    assert not guessed.is_unspecified and guessed.port == 7400
    fixed = NodeConfig(advertise=Address("10.1.2.3", 9000), data_dir=tmp_path)
    assert fixed.advertise_for(Address("0.0.0.0", 7400)) == Address("10.1.2.3", 9000)


def test_config_paths(tmp_path: Path) -> None:
    config = NodeConfig(data_dir=tmp_path)
    assert config.mesh_key_path == tmp_path / "mesh.key"
    assert config.identity_path == tmp_path / "identity.key"
    other = NodeConfig(data_dir=tmp_path, mesh_key_file=tmp_path / "x.key")
    assert other.mesh_key_path == tmp_path / "x.key"


@pytest.mark.parametrize(
    "changes",
    [
        {"preset": "fast"},
        {"log_level": "LOUD"},
        {"handshake_timeout": 0.0},
        {"leave_timeout": -1.0},
        {"max_connections": 0},
        {"idle_timeout": -1.0},
        {"idle_timeout": float("nan")},
        {"advertise": Address("0.0.0.0", 7400)},
        {"advertise": Address("10.0.0.1", 0)},
    ],
)
def test_config_rejects(changes: dict[str, object], tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        NodeConfig(data_dir=tmp_path, **changes)  # type: ignore[arg-type]


def _run_config(argv: list[str]) -> NodeConfig:
    return config_from_args(build_run_parser().parse_args(argv))


def _clear_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LISTEN", "JOIN", "DATA_DIR", "MESH_KEY_FILE", "PRESET", "LOG_LEVEL", "SEED",
                 "ADVERTISE", "HANDSHAKE_TIMEOUT", "CONNECT", "LOOP", "IDLE_TIMEOUT"):
        monkeypatch.delenv(f"STARMESH_{name}", raising=False)


def test_cli_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_env(monkeypatch)
    monkeypatch.setenv("HOME", "/home/someone")
    config = _run_config([])
    assert config.listen == Address("0.0.0.0", 7400)
    assert config.seeds == ()
    assert config.data_dir == Path("/home/someone/.starmesh")
    assert config.mesh_key_path == Path("/home/someone/.starmesh/mesh.key")
    assert config.preset == "lan" and config.log_level == "INFO" and config.use_uvloop
    assert config.idle_timeout == 300.0


def test_cli_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _clear_env(monkeypatch)
    config = _run_config([
        "--listen", "127.0.0.1:0", "--join", "10.0.0.5:7400", "--join", "10.0.0.6,10.0.0.7:1",
        "--data-dir", str(tmp_path), "--mesh-key-file", str(tmp_path / "m.key"), "--preset", "test",
        "--log-level", "debug", "--handshake-timeout", "1.5", "--loop", "asyncio", "--seed", "7",
        "--idle-timeout", "0",
    ])
    assert config.listen == Address("127.0.0.1", 0)
    assert config.seeds == (Address("10.0.0.5", 7400), Address("10.0.0.6", 7400), Address("10.0.0.7", 1))
    assert config.data_dir == tmp_path and config.mesh_key_path == tmp_path / "m.key"
    assert (config.preset, config.log_level, config.handshake_timeout) == ("test", "DEBUG", 1.5)
    assert not config.use_uvloop and config.seed == 7 and config.idle_timeout == 0.0


def test_cli_env_then_flag_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _clear_env(monkeypatch)
    monkeypatch.setenv("STARMESH_LISTEN", "127.0.0.1:7500")
    monkeypatch.setenv("STARMESH_JOIN", "10.0.0.5:7400, 10.0.0.6:7400")
    monkeypatch.setenv("STARMESH_PRESET", "local")
    monkeypatch.setenv("STARMESH_IDLE_TIMEOUT", "30")
    monkeypatch.setenv("STARMESH_DATA_DIR", str(tmp_path))
    config = _run_config([])
    assert config.listen == Address("127.0.0.1", 7500)
    assert config.seeds == (Address("10.0.0.5", 7400), Address("10.0.0.6", 7400))
    assert config.preset == "local" and config.data_dir == tmp_path and config.idle_timeout == 30.0
    flagged = _run_config(["--listen", "127.0.0.1:7600", "--join", "10.9.9.9:1"])
    assert flagged.listen == Address("127.0.0.1", 7600)
    assert flagged.seeds == (Address("10.9.9.9", 1),)


def test_cli_bad_values_are_config_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_env(monkeypatch)
    with pytest.raises(ConfigError, match="--handshake-timeout"):
        _run_config(["--handshake-timeout", "soon"])
    with pytest.raises(ConfigError, match="--join"):
        _run_config(["--join", "a:b:c"])
    monkeypatch.setenv("STARMESH_LISTEN", "nonsense:xx")
    with pytest.raises(ConfigError, match="--listen"):
        _run_config([])


def test_cli_help_names_every_env_var(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_run_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("LISTEN", "ADVERTISE", "JOIN", "DATA_DIR", "MESH_KEY_FILE", "PRESET", "LOG_LEVEL",
                 "READY_FILE", "HANDSHAKE_TIMEOUT", "DIAL_TIMEOUT", "LEAVE_TIMEOUT", "LOOP", "SEED",
                 "MAX_CONNECTIONS", "MAX_HANDSHAKING", "INBOX_MESSAGES", "WRITE_BUFFER_BYTES",
                 "IDLE_TIMEOUT"):
        assert f"STARMESH_{name}" in out
    assert "mesh-key new" in out and "status" in out


def test_status_parser_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_env(monkeypatch)
    args = build_status_parser().parse_args(["--json"])
    assert args.connect == "127.0.0.1:7400" and args.json


def test_main_reports_config_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--listen", "host:xx", "--data-dir", str(tmp_path)]) == 2
    assert "error: --listen" in capsys.readouterr().err


def test_main_mesh_key_new(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "sub" / "mesh.key"
    assert main(["mesh-key", "new", str(path)]) == 0
    assert path.stat().st_mode & 0o777 == 0o600
    assert main(["mesh-key", "new", str(path)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_main_status_without_key_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["status", "--mesh-key-file", str(tmp_path / "missing.key")])
    assert code == 2
    assert "missing.key" in capsys.readouterr().err
