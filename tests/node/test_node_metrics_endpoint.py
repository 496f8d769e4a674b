"""``--metrics-listen``: a running node serves its metrics over HTTP and in ``status`` (integration)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from node.config import Address, NodeConfig
from node.identity import load_mesh_key
from node.metrics import METRICS
from node.runtime import Node
from node.status import fetch_status, reply_to_json
from node.testing import until
from protocol.messages.gossip import MemberStatus

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def http_get(address: str, path: str) -> tuple[int, str]:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


def _config(tmp_path: Path, name: str, key: Path, **changes: object) -> NodeConfig:
    return NodeConfig(listen=Address("127.0.0.1", 0), data_dir=tmp_path / name, mesh_key_file=key,
                      preset="test", use_uvloop=False, **changes)  # type: ignore[arg-type]


async def test_metrics_endpoint_and_status_report_the_mesh(tmp_path: Path) -> None:
    key = tmp_path / "mesh.key"
    async with Node(_config(tmp_path, "a", key, metrics_listen=Address("127.0.0.1", 0))) as a:
        seed = (Address("127.0.0.1", int(a.address.rsplit(":", 1)[1])),)
        async with Node(_config(tmp_path, "b", key, seeds=seed)) as b:
            def alive(node: Node) -> int:
                return sum(m.status is MemberStatus.ALIVE for m in node.members())

            await until(lambda: alive(a) == 2 and alive(b) == 2)
            assert a.metrics_address is not None and b.metrics_address is None
            code, body = await http_get(a.metrics_address, "/metrics")
            assert code == 200
            families = {f.name: f for f in text_string_to_metric_families(body)}
            members = {s.labels["state"]: s.value for s in families["starmesh_members"].samples}
            assert members["alive"] == 2.0
            sent = {s.labels["channel"]: s.value for s in families["starmesh_sent_bytes"].samples}
            assert sent["control"] > 0
            assert "starmesh_allreduce_rounds" in families
            assert (await http_get(a.metrics_address, "/nope"))[0] == 404

            reply = await fetch_status(Address("127.0.0.1", int(a.address.rsplit(":", 1)[1])),
                                       mesh_secret=load_mesh_key(key))
            metrics = reply_to_json(reply)["metrics"]
            assert metrics['members{state="alive"}'] == 2.0

            undocumented = sorted(set(a.stats()) - set(METRICS))
            assert undocumented == [], f"metrics without a spec in node.metrics.METRICS: {undocumented}"
