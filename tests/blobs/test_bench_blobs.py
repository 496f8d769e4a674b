"""``bench blobs``: its options, and a short run with real node processes on loopback (checks
that every copy came back with the right digest, that the liar was caught and the kill
happened, and the JSON line's shape; timings are never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from simulations.__main__ import build_parser
from simulations.bench_blobs import run
from simulations.nodeprocs import REPO_ROOT


def test_bench_blobs_options() -> None:
    args = build_parser(["bench", "blobs"]).parse_args(["bench", "blobs"])
    assert (args.downloaders, args.size_mb, args.shape, args.faults, args.fault_downloaders) == (
        "1,2,4,6", 256.0, "loopback", "kill,liar", 4)
    assert args._run is run
    shaped = build_parser(["bench", "blobs"]).parse_args(["bench", "blobs", "--shape"])
    assert shaped.shape == "100mbit"


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_bench_blobs_short_run_verifies_every_copy() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "simulations", "bench", "blobs", "--size-mb", "4", "--downloaders", "1,2",
         "--fault-downloaders", "2", "--node-upload-rate", "2000000", "--preset", "test"],  # 2 s a copy: the 30% kill point is seen under load
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["bench"] == "blobs" and result["failures"] == [] and result["links"] == ["loopback"]
    assert result["size_bytes"] == 4 << 20
    rows = {(r["case"], r["k"]): r for r in result["rows"]}
    assert set(rows) == {("swarm", 1), ("swarm", 2), ("liar", 2), ("kill", 2)}
    for row in rows.values():
        assert row["verified"] == row["k"] and row["errors"] == []
        assert len(row["each_s"]) == row["k"] and row["last_s"] == max(row["each_s"])
        assert row["reference"] == "k=1 measured" and row["ratio"] is not None
    assert rows[("swarm", 1)]["seeder_uploaded_bytes"] == pytest.approx(4 << 20, rel=0.01)
    assert rows[("liar", 2)]["notes"]["liar_chunks"]["corrupted"] > 0
    assert sum(rows[("liar", 2)]["blamed"]) > 0
    assert rows[("kill", 2)]["notes"]["killed"] == "n0"
    assert rows[("kill", 2)]["notes"]["held_at_kill"] < 1.0
