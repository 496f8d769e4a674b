"""``--bulk-congestion``: the TCP congestion control of tensor links (``node.congestion``)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import numpy as np
import pytest

from node import congestion
from node.cli import build_run_parser, config_from_args
from node.config import Address, LinkConfig, NodeConfig
from node.runtime import Node
from protocol.connection import Channel
from protocol.errors import ConfigError

needs_linux = pytest.mark.skipif(not hasattr(socket, "TCP_CONGESTION"), reason="needs TCP_CONGESTION (Linux)")


def _other_usable() -> str | None:
    """An algorithm this process may set that is not the system default (None: none)."""
    default = congestion.system_default()
    for name in congestion.available():
        if name == default:
            continue
        try:
            congestion.check(name)
        except ConfigError:
            continue
        return name
    return None


@pytest.mark.parametrize("name", ["", "BBR", "cubic!", "a" * 16, "../x"])
def test_bad_names_are_config_errors(name: str) -> None:
    with pytest.raises(ConfigError):
        congestion.validate_name(name)
    with pytest.raises(ConfigError):
        NodeConfig(data_dir=Path("/nonexistent"), links=LinkConfig(bulk_congestion=name))


def test_cli_flag_and_system_default() -> None:
    parser = build_run_parser()
    assert config_from_args(parser.parse_args([])).links.bulk_congestion is None
    assert config_from_args(parser.parse_args(["--bulk-congestion", "system"])).links.bulk_congestion is None
    assert config_from_args(parser.parse_args(["--bulk-congestion", "reno"])).links.bulk_congestion == "reno"


@needs_linux
def test_unknown_algorithm_fails_the_check_with_the_offered_list() -> None:
    with pytest.raises(ConfigError, match="cannot be used here"):
        congestion.check("nosuchcc")


@needs_linux
def test_apply_and_current_round_trip() -> None:
    default = congestion.system_default()
    congestion.check(default)
    with socket.socket() as s:
        congestion.apply(s, default)
        assert congestion.current(s) == default


@pytest.mark.integration
@pytest.mark.timeout(60)
@needs_linux
async def test_bulk_links_use_the_chosen_algorithm_and_control_links_keep_the_default(tmp_path: Path) -> None:
    chosen = _other_usable()
    if chosen is None:
        pytest.skip("this kernel offers this process no second congestion control to choose")
    default = congestion.system_default()
    key = tmp_path / "mesh.key"

    def config(name: str, seeds: tuple[Address, ...] = ()) -> NodeConfig:
        return NodeConfig(listen=Address("127.0.0.1", 0), data_dir=tmp_path / name, mesh_key_file=key,
                          seeds=seeds, preset="test", use_uvloop=False,
                          links=LinkConfig(bulk_congestion=chosen))

    async with Node(config("a")) as a:
        seed = (Address("127.0.0.1", int(a.address.rsplit(":", 1)[1])),)
        async with Node(config("b", seed)) as b:
            async with asyncio.timeout(10):
                while len([m for m in a.members() if m.status.name == "ALIVE"]) < 2:
                    await asyncio.sleep(0.01)
            group = [a.node_id, b.node_id]
            xs = [np.full(1000, 1.0, np.float32), np.full(1000, 3.0, np.float32)]
            outs = await asyncio.gather(a.all_reduce(xs[0], group=group, timeout=20),
                                        b.all_reduce(xs[1], group=group, timeout=20))
            np.testing.assert_array_equal(outs[0].tensor, np.full(1000, 2.0, np.float32))
            for node in (a, b):  # both the dialing and the accepting side of every link
                links = [(lk.peer.channel, lk.congestion()) for lk in node.links() if lk.peer is not None]
                bulk = [cc for channel, cc in links if channel is Channel.BULK]
                control = [cc for channel, cc in links if channel is Channel.CONTROL]
                assert bulk and set(bulk) == {chosen}
                assert control and set(control) == {default}
