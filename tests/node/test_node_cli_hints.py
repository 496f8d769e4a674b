"""What the CLI tells a new user who got something wrong (in process, no node started):
``--version``, a mistyped command or flag, a URL given as an address, a bad environment
variable, ``status`` without a key or without a node to ask."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from node.cli import (
    ClientOptions,
    build_run_parser,
    config_from_args,
    main,
    parse_args,
    run_options,
    status_failure_hint,
    unknown_command,
    version,
)
from node.config import Address, ClientConfig, NodeConfig, parse_address
from node.identity import create_mesh_key
from protocol.errors import ConfigError, ErrorCode, RemoteProtocolError, TransportError


@pytest.fixture(autouse=True)
def _no_starmesh_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for opt in run_options() + ClientOptions("status").options:
        monkeypatch.delenv(opt.env, raising=False)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?\S*", version())
    for flag in ("--version", "-V"):
        with pytest.raises(SystemExit) as exit_info:
            main([flag])
        assert exit_info.value.code == 0
        assert capsys.readouterr().out.strip() == f"starmesh {version()}"


@pytest.mark.parametrize(("typo", "command"), [("stauts", "status"), ("statu", "status"),
                                               ("mesh-kye", "mesh-key"), ("rn", "run")])
def test_a_mistyped_command_gets_a_suggestion(capsys: pytest.CaptureFixture[str], typo: str,
                                              command: str) -> None:
    assert main([typo, "--json"]) == 2
    err = capsys.readouterr().err
    assert f"unknown command {typo!r} (did you mean {command}?)" in err
    assert "run, status, mesh-key" in err


def test_a_word_like_no_command_is_refused_without_a_guess() -> None:
    text = unknown_command("xyzzy")
    assert "did you mean" not in text and "unknown command 'xyzzy'" in text


def test_a_mistyped_flag_gets_a_suggestion(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(build_run_parser(), ["--jion", "10.0.0.5:7400"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --jion 10.0.0.5:7400 (did you mean --join?)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["status", "--conect=127.0.0.1:1"])
    assert "(did you mean --connect?)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "default_port", "hint"),
    [
        ("http://x", 7400, "'x:7400'"),
        ("http://x", None, "'x:PORT'"),
        ("https://10.0.0.5:7400/", None, "'10.0.0.5:7400'"),
        ("tcp://[::1]:7400", None, "'[::1]:7400'"),
        ("http://", 7400, "'HOST:7400'"),
    ],
)
def test_a_url_gets_a_host_port_hint_not_an_ipv6_one(text: str, default_port: int | None,
                                                    hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_address(text, what="--join", default_port=default_port)
    message = str(info.value)
    assert "expected HOST:PORT without a scheme" in message and hint in message
    assert "IPv6" not in message


def test_join_url_from_flag_and_from_env(monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--join", "http://x", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--join 'http://x'" in err and "HOST:PORT" in err and "IPv6" not in err
    monkeypatch.setenv("STARMESH_JOIN", "http://x")
    assert main(["--data-dir", str(tmp_path)]) == 2
    assert "$STARMESH_JOIN" in capsys.readouterr().err
    assert not tmp_path.joinpath("mesh.key").exists()


@pytest.mark.parametrize(
    ("variable", "value"),
    [("STARMESH_JOIN_TIMEOUT", "soon"), ("STARMESH_JOIN_TIMEOUT", "-1"), ("STARMESH_LISTEN", "a:b:c"),
     ("STARMESH_IDLE_TIMEOUT", "x"), ("STARMESH_MAX_CONNECTIONS", "0"), ("STARMESH_PRESET", "fast")],
)
def test_environment_errors_name_the_variable(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                              variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    assert main(["--data-dir", str(tmp_path)]) == 2
    assert f"${variable}" in capsys.readouterr().err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_join_timeout_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    assert NodeConfig().join_timeout == 60.0
    config = config_from_args(build_run_parser().parse_args(["--join-timeout", "0"]))
    assert config.join_timeout == 0.0  # retry forever
    monkeypatch.setenv("STARMESH_JOIN_TIMEOUT", "5")
    assert config_from_args(build_run_parser().parse_args([])).join_timeout == 5.0
    with pytest.raises(ConfigError, match="--join-timeout"):
        config_from_args(build_run_parser().parse_args(["--join-timeout", "-3"]))


def test_status_without_the_key_says_which_flags_to_pass(capsys: pytest.CaptureFixture[str],
                                                         tmp_path: Path) -> None:
    assert main(["status", "--data-dir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nowhere" / "mesh.key") in err
    assert "--mesh-key-file PATH" in err and "--data-dir DIR" in err
    assert not (tmp_path / "nowhere").exists()  # status never creates a key


def test_status_with_no_node_listening_says_what_to_pass(capsys: pytest.CaptureFixture[str],
                                                         tmp_path: Path) -> None:
    create_mesh_key(tmp_path / "mesh.key")
    port = _closed_port()
    assert main(["status", "--data-dir", str(tmp_path), "--connect", f"127.0.0.1:{port}",
                 "--timeout", "2"]) == 1
    err = capsys.readouterr().err
    assert f"cannot get status from 127.0.0.1:{port}" in err
    assert f"is a node running at 127.0.0.1:{port}?" in err and "--connect HOST:PORT" in err


def test_status_refused_key_hint() -> None:
    client = ClientConfig(connect=Address("10.0.0.5", 7400), mesh_key_file=Path("/k/mesh.key"))
    refused = RemoteProtocolError("mesh secret proof failed", code=ErrorCode.AUTH_FAILED)
    hint = status_failure_hint(refused, client)
    assert "refused the mesh key in /k/mesh.key" in hint and "--mesh-key-file" in hint
    assert "--connect" in status_failure_hint(TransportError("refused"), client)
