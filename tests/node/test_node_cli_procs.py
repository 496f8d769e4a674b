"""Real ``python -m node`` processes a new user runs wrong: a joiner without its key, a wrong
key, seeds that are down or do not resolve, a busy port, a damaged identity; and a clean
shutdown that prints no stray warnings."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.identity import create_mesh_key
from simulations.nodeprocs import REPO_ROOT, LocalMesh, NodeProcess, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

#: What must never reach a cleanly stopped node's output.
STRAY = ("Traceback", "ResourceWarning", "Task was destroyed", "Exception ignored", "was never awaited",
         "DeprecationWarning", "RuntimeWarning")


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("STARMESH_")}


def _node(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node", *args], cwd=REPO_ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_args(data_dir: Path, *more: str) -> list[str]:
    return ["--listen", "127.0.0.1:0", "--data-dir", str(data_dir), "--preset", "test", *more]


def test_version_and_a_mistyped_command() -> None:
    out = _node("--version")
    assert out.returncode == 0 and re.fullmatch(r"starmesh \d+\.\d+\S*\n", out.stdout)
    script = Path(sys.executable).with_name("starmesh")
    if script.exists():  # the console script pip installs
        assert subprocess.run([str(script), "--version"], capture_output=True, text=True,
                              timeout=30, check=True).stdout == out.stdout
    typo = _node("stauts")
    assert typo.returncode == 2 and "did you mean status?" in typo.stderr


def test_a_joiner_with_a_mistyped_key_file_exits_2_and_creates_nothing(tmp_path: Path) -> None:
    data = tmp_path / "X"
    typo = data / "typo.key"
    cmd = ["--listen", "127.0.0.1:0", "--data-dir", str(data), "--mesh-key-file", str(typo),
           "--join", f"127.0.0.1:{_closed_port()}"]
    if shutil.which("timeout"):  # exactly as the acceptance check runs it
        out = subprocess.run(["timeout", "10", sys.executable, "-m", "node", *cmd], cwd=REPO_ROOT,
                             env=_env(), capture_output=True, text=True, timeout=30)
    else:
        out = _node(*cmd, timeout=10)
    assert out.returncode == 2, out.stderr
    assert f"{typo}: no mesh key" in out.stderr and f"python -m node mesh-key new {typo}" in out.stderr
    assert "scp" in out.stderr
    assert not typo.exists() and not (data / "identity.key").exists()


def test_every_seed_refusing_our_key_ends_the_join(tmp_path: Path) -> None:
    mesh = LocalMesh(tmp_path / "mesh", preset="test")
    try:
        seed = mesh.add()
        mesh.wait_ready([seed])
        other = tmp_path / "other.key"
        create_mesh_key(other)
        started = time.monotonic()
        out = _node(*_run_args(tmp_path / "joiner", "--mesh-key-file", str(other), "--join", seed.address,
                               "--join-timeout", "2"))
        elapsed = time.monotonic() - started
        assert out.returncode == 1, out.stderr
        assert 2 <= elapsed < 20
        assert f"seed {seed.address} refused our mesh key (AUTH_FAILED: wrong mesh key)" in out.stderr
        assert f"{seed.address}: refused our mesh key" in out.stderr
        assert f"every seed refused our mesh key: {other} is not the key of this mesh" in out.stderr
        status = _node("status", "--connect", seed.address, "--mesh-key-file", str(other), "--timeout", "5")
        assert status.returncode == 1
        assert f"the node at {seed.address} refused the mesh key in {other}" in status.stderr
        assert seed.stop() == 0
    finally:
        mesh.close()


def test_unreachable_and_unresolvable_seeds_end_the_join_saying_which(tmp_path: Path) -> None:
    key = tmp_path / "mesh.key"
    create_mesh_key(key)
    closed = f"127.0.0.1:{_closed_port()}"
    out = _node(*_run_args(tmp_path / "joiner", "--mesh-key-file", str(key), "--join", closed,
                           "--join", "no-such-host.invalid:7400", "--join-timeout", "1"))
    assert out.returncode == 1, out.stderr
    assert "seed no-such-host.invalid:7400: its host name does not resolve" in out.stderr  # at once
    assert f"  {closed}: unreachable (" in out.stderr
    assert "  no-such-host.invalid:7400: its host name does not resolve" in out.stderr
    assert "is a node running at each --join address" in out.stderr


def test_a_busy_port_exits_2_before_writing_anything(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        data = tmp_path / "data"
        out = _node("--listen", f"127.0.0.1:{port}", "--data-dir", str(data))
    assert out.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}: port {port} is already in use" in out.stderr
    assert not data.exists()


def test_a_damaged_identity_is_refused_not_replaced(tmp_path: Path) -> None:
    node = NodeProcess(data_dir=tmp_path / "n", mesh_key=tmp_path / "n" / "mesh.key")
    node.start()
    wait_for(node.poll_ready, 20, what="node ready", detail=node.log_text)
    assert node.stop() == 0
    identity = node.data_dir / "identity.key"
    damaged = bytearray(identity.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    identity.write_bytes(bytes(damaged))
    out = _node(*_run_args(node.data_dir))
    assert out.returncode == 2
    assert f"{identity}: the identity key is damaged" in out.stderr
    assert identity.read_bytes() == bytes(damaged)


@pytest.mark.parametrize("loop", ["auto", "asyncio"])
def test_a_clean_shutdown_prints_no_stray_warnings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   loop: str) -> None:
    monkeypatch.setenv("PYTHONWARNINGS", "default")  # show every warning the nodes would hide
    mesh = LocalMesh(tmp_path, preset="test")
    try:
        seed = mesh.add(extra_args=["--loop", loop])
        mesh.wait_ready([seed])
        joiner = mesh.add(seeds=[seed.address], extra_args=["--loop", loop])
        mesh.wait_ready([joiner])
        wait_for(lambda: "member joined" in seed.log_text(), 20, what="join", detail=seed.log_text)
        status = _node("status", "--connect", seed.address, "--mesh-key-file", str(mesh.mesh_key))
        assert status.returncode == 0, status.stderr
        for node in (joiner, seed):
            assert node.proc is not None
            node.signal(signal.SIGTERM)
            assert node.proc.wait(10) == 0
    finally:
        mesh.close()
    for node in (seed, joiner):
        text = node.log_text()
        assert not [s for s in STRAY if s in text], text
        assert text.count("is up at") == 1  # the CLI's banner, printed once
