"""NodeConfig, address parsing and the CLI's flag/env/default resolution (no sockets)."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from discovery.config import PRESETS, SwimConfig
from node.allreduce.config import AllReduceSettings
from node.cli import (
    ClientOptions,
    build_run_parser,
    build_status_parser,
    config_from_args,
    main,
    run_options,
)
from node.config import (
    PRESET_NAMES,
    Address,
    ClientConfig,
    ExecutorConfig,
    LinkConfig,
    NodeConfig,
    parse_address,
)
from node.options import Override, field_docs, options_of
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
    def guess() -> str:
        return "10.9.8.7"

    loop = NodeConfig(listen=Address("127.0.0.1", 0), data_dir=tmp_path)
    assert loop.advertise_for(Address("127.0.0.1", 5555), local_ip=guess) == Address("127.0.0.1", 5555)
    local = NodeConfig(listen=Address("localhost", 7400), data_dir=tmp_path)
    assert local.advertise_for(Address("127.0.0.1", 7400), local_ip=guess) == Address("127.0.0.1", 7400)
    wild = NodeConfig(listen=Address("0.0.0.0", 7400), data_dir=tmp_path)
    guessed = wild.advertise_for(Address("0.0.0.0", 7400), local_ip=guess)
    assert guessed == Address("10.9.8.7", 7400)
    fixed = NodeConfig(advertise=Address("10.1.2.3", 9000), data_dir=tmp_path)
    assert fixed.advertise_for(Address("0.0.0.0", 7400), local_ip=guess) == Address("10.1.2.3", 9000)


def test_config_paths(tmp_path: Path) -> None:
    config = NodeConfig(data_dir=tmp_path)
    assert config.mesh_key_path == tmp_path / "mesh.key"
    assert config.identity_path == tmp_path / "identity.key"
    other = NodeConfig(data_dir=tmp_path, mesh_key_file=tmp_path / "x.key")
    assert other.mesh_key_path == tmp_path / "x.key"


@pytest.mark.parametrize(
    ("cls", "changes"),
    [
        (NodeConfig, {"preset": "fast"}),
        (NodeConfig, {"log_level": "LOUD"}),
        (NodeConfig, {"leave_timeout": -1.0}),
        (NodeConfig, {"advertise": Address("0.0.0.0", 7400)}),
        (NodeConfig, {"advertise": Address("10.0.0.1", 0)}),
        (LinkConfig, {"handshake_timeout": 0.0}),
        (LinkConfig, {"max_connections": 0}),
        (LinkConfig, {"inbox_bytes": 0}),
        (LinkConfig, {"idle_timeout": -1.0}),
        (LinkConfig, {"idle_timeout": float("nan")}),
        (LinkConfig, {"bulk_congestion": "no such!"}),
        (ExecutorConfig, {"codec_threads": 0}),
        (ClientConfig, {"timeout": 0.0}),
    ],
)
def test_config_rejects(cls: type, changes: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        cls(**changes)


def test_presets_are_one_table() -> None:
    assert PRESET_NAMES == tuple(PRESETS) == ("lan", "wan", "local", "test")
    assert all(isinstance(make(), SwimConfig) for make in PRESETS.values())


def _run_config(argv: list[str]) -> NodeConfig:
    return config_from_args(build_run_parser().parse_args(argv))


def _clear_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for opt in run_options() + ClientOptions("status").options:
        monkeypatch.delenv(opt.env, raising=False)


def test_cli_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_env(monkeypatch)
    monkeypatch.setenv("HOME", "/home/someone")
    config = _run_config([])
    assert config.listen == Address("0.0.0.0", 7400)
    assert config.seeds == ()
    assert config.data_dir == Path("/home/someone/.starmesh")
    assert config.mesh_key_path == Path("/home/someone/.starmesh/mesh.key")
    assert config.preset == "lan" and config.log_level == "INFO" and config.use_uvloop
    assert config.links == LinkConfig() and config.allreduce == AllReduceSettings()
    assert config.metrics_listen is None


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
    assert (config.preset, config.log_level, config.links.handshake_timeout) == ("test", "DEBUG", 1.5)
    assert not config.use_uvloop and config.seed == 7 and config.links.idle_timeout == 0.0


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
    assert config.preset == "local" and config.data_dir == tmp_path and config.links.idle_timeout == 30.0
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
    monkeypatch.setenv("HOME", "/home/someone")
    args = build_status_parser().parse_args(["--json"])
    client = ClientOptions("status").resolve(args)
    assert args.json and client == ClientConfig(connect=Address("127.0.0.1", 7400), timeout=3.0)
    assert client.mesh_key_path == Path("/home/someone/.starmesh/mesh.key")


def test_status_flags_and_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _clear_env(monkeypatch)
    monkeypatch.setenv("STARMESH_STATUS_TIMEOUT", "7")
    monkeypatch.setenv("STARMESH_CONNECT", "10.0.0.5")
    args = build_status_parser().parse_args(["--data-dir", str(tmp_path)])
    client = ClientOptions("status").resolve(args)
    assert client.connect == Address("10.0.0.5", 7400) and client.timeout == 7.0
    assert client.mesh_key_path == tmp_path / "mesh.key"
    with pytest.raises(ConfigError, match="--timeout"):
        ClientOptions("status").resolve(build_status_parser().parse_args(["--timeout", "-1"]))


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


def _leaf_paths(cls: type, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every leaf field of a config tree, walked independently of ``node.options``."""
    hints = typing.get_type_hints(cls)
    out: list[tuple[str, ...]] = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        nested = isinstance(hint, type) and dataclasses.is_dataclass(hint) and hint is not Address
        out += _leaf_paths(hint, (*path, f.name)) if nested else [(*path, f.name)]
    return out


def test_every_leaf_field_has_a_flag_an_env_var_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    options = {opt.path: opt for opt in run_options()}
    leaves = _leaf_paths(NodeConfig)
    assert sorted(options) == sorted(leaves)
    with pytest.raises(SystemExit):
        build_run_parser().parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for path in leaves:
        opt = options[path]
        assert opt.help and opt.help.endswith(".") and opt.env.startswith("STARMESH_")
        assert opt.help == " ".join(field_docs(_owner(path)).get(path[-1], "?").split()).replace("``", "")
        assert opt.flag in out and opt.env in out
    assert " ".join(f"{options[('links', 'idle_timeout')].help} [env STARMESH_IDLE_TIMEOUT; default: 300.0]".split()) in out


def _owner(path: tuple[str, ...]) -> type:
    cls: type = NodeConfig
    for name in path[:-1]:
        cls = typing.get_type_hints(cls)[name]
    return cls


def test_flag_and_env_names() -> None:
    names = {opt.path: (opt.flag, opt.env) for opt in run_options()}
    assert names[("links", "idle_timeout")] == ("--idle-timeout", "STARMESH_IDLE_TIMEOUT")
    assert names[("links", "bulk_congestion")] == ("--bulk-congestion", "STARMESH_BULK_CONGESTION")
    assert names[("seeds",)] == ("--join", "STARMESH_JOIN")
    assert names[("use_uvloop",)] == ("--loop", "STARMESH_LOOP")
    assert names[("executors", "codec_threads")] == ("--codec-threads", "STARMESH_CODEC_THREADS")
    assert names[("allreduce", "link_bytes_per_s")] == (
        "--allreduce-link-bytes-per-s", "STARMESH_ALLREDUCE_LINK_BYTES_PER_S")
    assert names[("metrics_listen",)] == ("--metrics-listen", "STARMESH_METRICS_LISTEN")


def test_nested_field_env_then_flag_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_env(monkeypatch)
    assert _run_config([]).allreduce.link_bytes_per_s == AllReduceSettings().link_bytes_per_s
    monkeypatch.setenv("STARMESH_ALLREDUCE_LINK_BYTES_PER_S", "1e9")
    monkeypatch.setenv("STARMESH_ALLREDUCE_EARLY_AVERAGES", "off")
    monkeypatch.setenv("STARMESH_INBOX_BYTES", "1024")
    from_env = _run_config([])
    assert from_env.allreduce == AllReduceSettings(link_bytes_per_s=1e9, early_averages=False)
    assert from_env.links == LinkConfig(inbox_bytes=1024)
    flagged = _run_config(["--allreduce-link-bytes-per-s", "5e6", "--allreduce-outlier-factor", "none",
                           "--codec-threads", "3", "--metrics-listen", "127.0.0.1:9100"])
    assert flagged.allreduce == AllReduceSettings(link_bytes_per_s=5e6, early_averages=False,
                                                  outlier_factor=None)
    assert flagged.executors.codec_threads == 3 and flagged.links.inbox_bytes == 1024
    assert flagged.metrics_listen == Address("127.0.0.1", 9100)
    monkeypatch.setenv("STARMESH_ALLREDUCE_LINK_BYTES_PER_S", " ")  # blank: unset
    assert _run_config([]).allreduce.link_bytes_per_s == AllReduceSettings().link_bytes_per_s


@pytest.mark.parametrize(
    ("argv", "env", "flag"),
    [
        (["--allreduce-link-bytes-per-s", "fast"], {}, "--allreduce-link-bytes-per-s"),
        (["--allreduce-link-bytes-per-s", "-1"], {}, "--allreduce-link-bytes-per-s"),
        ([], {"STARMESH_ALLREDUCE_LINK_BYTES_PER_S": "0"}, "--allreduce-link-bytes-per-s"),
        (["--allreduce-early-averages", "maybe"], {}, "--allreduce-early-averages"),
        (["--idle-timeout", "-1"], {}, "--idle-timeout"),
        (["--max-connections", "many"], {}, "--max-connections"),
        (["--codec-threads", "0"], {}, "--codec-threads"),
        (["--metrics-listen", "9100"], {}, "--metrics-listen"),
        (["--bulk-congestion", "no such!"], {}, "--bulk-congestion"),
        ([], {"STARMESH_LOOP": "uv"}, "--loop"),
        ([], {"STARMESH_LOG_LEVEL": "loud"}, "--log-level"),
        (["--leave-timeout", "0"], {}, "--leave-timeout"),
    ],
)
def test_bad_values_name_the_flag(monkeypatch: pytest.MonkeyPatch, argv: list[str],
                                  env: dict[str, str], flag: str) -> None:
    _clear_env(monkeypatch)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=flag):
        _run_config(argv)


def test_bad_flag_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--allreduce-window-bytes", "0", "--data-dir", str(tmp_path)]) == 2
    assert "error: --allreduce-window-bytes" in capsys.readouterr().err


def test_generator_rejects_fields_without_help_or_parser() -> None:
    @dataclasses.dataclass(frozen=True)
    class Undocumented:
        size: int = 1

    @dataclasses.dataclass(frozen=True)
    class Unparsable:
        sizes: list[int] = dataclasses.field(default_factory=list)
        """No parser for lists."""

    with pytest.raises(TypeError, match="docstring"):
        options_of(Undocumented())
    with pytest.raises(TypeError, match="no parser"):
        options_of(Unparsable())
    with pytest.raises(TypeError, match="no field"):
        options_of(LinkConfig(), overrides={"idle_timout": Override(flag="x")})
