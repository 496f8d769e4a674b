"""``python -m simulations bench blobs``: k newcomers fetch one blob from one seeder, real processes.

For each link setting (``--shape``: ``loopback``, or a rate such as ``100mbit``, for which
every node runs in its own network namespace with its link shaped both ways by ``tc tbf``,
as ``bench allreduce`` does; needs root, skipped with the reason otherwise) one mesh of real
``python -m node`` processes is started: a seeder ``n0`` and ``max(--downloaders)``
downloaders, plus, for the fault cases, a second honest holder and a liar
(``simulations.blob_liar_worker``). Every run puts a fresh blob of ``--size-mb`` MiB of
random bytes on its holders (``python -m node blob put``) and then has k downloaders fetch it
at the same instant: each runs ``simulations.blob_fetch_worker`` next to its node (in its
namespace), which asks its node for the blob over a CLIENT link, notes when the node holds
it all (verified chunk by chunk by the node), then reads it back and checks its SHA-256.

Cases: ``swarm`` for each k of ``--downloaders``; ``kill``: the seeder and a second holder
hold the blob, ``--fault-downloaders`` fetch it, and the seeder is ``kill -9``ed once they
hold ``--kill-at`` of it on average; ``liar``: the seeder and the liar (every chunk it serves
has a byte flipped) hold it. Per run: seconds until the last downloader holds the blob, the
reference (shaped: ``S/B``, blob size over the per-node link rate, the least any downloader
can take; loopback has no link rate, so the reference is the measured time of one downloader
alone, the ``swarm`` k=1 run), their ratio, the bytes the seeder uploaded (its
``blob_uploaded_bytes_total``) against ``k*S`` (what serving every downloader alone would
cost it), the bytes downloaders uploaded to each other, blame counts, and whether every copy
read back has the right digest. A table, then one JSON line; exit 1 if any copy is missing
or wrong.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from simulations.allreduce_procs import Worker
from simulations.benchmesh import BenchMesh
from simulations.netshape import ShapedNet, rate_bytes_per_s, unavailable
from simulations.nodeprocs import wait_for

MiB = 1 << 20
GOAL_K = 4
GOAL_RATIO = 1.3
"""The issue's goal: the last of 4 downloaders within 1.3 x S/B on the shaped links."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--downloaders", default="1,2,4,6", help="comma-separated k: downloaders per swarm run")
    parser.add_argument("--size-mb", type=float, default=256.0, help="blob size in MiB (default 256)")
    parser.add_argument("--shape", nargs="?", const="100mbit", default="loopback",
                        help="comma-separated link settings: loopback and/or rates (100mbit); bare --shape: "
                             "100mbit; rates need root and ip netns, and are skipped with a message otherwise")
    parser.add_argument("--faults", default="kill,liar", help="fault cases: kill, liar (comma-separated; '' none)")
    parser.add_argument("--fault-downloaders", type=int, default=4, help="downloaders in the fault cases")
    parser.add_argument("--kill-at", type=float, default=0.3,
                        help="kill -9 the seeder once the downloaders hold this share of the blob on average")
    parser.add_argument("--preset", default="local", help="SWIM preset of the nodes (default local)")
    parser.add_argument("--bulk-congestion", metavar="NAME", help="TCP congestion control of the nodes' BULK links")
    parser.add_argument("--node-upload-rate", type=float, default=0.0, metavar="BYTES_PER_S",
                        help="--blob-upload-rate of the honest nodes (0: no limit); slows loopback runs down, "
                             "e.g. so that a small blob is still in flight when the kill comes")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one run may take")
    parser.add_argument("--seed", type=int, default=0, help="seeds the blobs' bytes and the liar")
    parser.add_argument("--dir", type=Path, default=None, help="keep data dirs and logs here (default: a temp dir)")


@dataclass
class Row:
    link: str
    case: str
    k: int
    size_bytes: int
    last_s: float | None
    """Seconds from the start until the last downloader's node held the whole blob."""
    each_s: list[float]
    reference_s: float | None
    reference: str
    ratio: float | None
    seeder_uploaded_bytes: float | None
    seeder_vs_kS: float | None
    peers_uploaded_bytes: float
    """Bytes the downloaders uploaded to each other (swarming)."""
    verified: int
    """Downloaders whose copy read back with the right SHA-256."""
    blamed: list[float]
    """Holders each downloader blamed for a bad chunk."""
    errors: list[str] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)


class Mesh(BenchMesh):
    """The node processes of one link setting: ``n0`` seeder, downloaders, holder, liar."""

    def __init__(self, root: Path, *, count: int, liar: int | None, net: ShapedNet | None,
                 args: argparse.Namespace) -> None:
        super().__init__(root, net=net)
        self.args = args
        self.liar_acts = root / "liar.json"
        for i in range(count):
            extra = ["--acts", str(self.liar_acts), "--seed", str(args.seed)] if i == liar else []
            extra += ["--bulk-congestion", args.bulk_congestion] if args.bulk_congestion else []
            if args.node_upload_rate and i != liar:
                extra += ["--blob-upload-rate", f"{args.node_upload_rate:g}"]
            self.start(preset=args.preset, module="simulations.blob_liar_worker" if i == liar else "node",
                       extra=extra)

    def put(self, i: int, path: Path) -> str:
        done = self.cli(i, "blob", "put", str(path), "--json", "--timeout", "120")
        if done.returncode != 0:
            raise RuntimeError(f"blob put on n{i} failed: {done.stderr.strip()}")
        blob_id: str = json.loads(done.stdout)["id"]
        return blob_id


@dataclass
class Clients:
    """The ``blob_fetch_worker`` processes of one run and their meeting directory."""

    run_dir: Path
    workers: dict[int, Worker]
    fetching: list[int]

    def read(self, i: int, suffix: str) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads((self.run_dir / f"n{i}.{suffix}").read_text())
        except (OSError, ValueError):
            return None
        return data

    def exited(self, i: int) -> bool:
        proc = self.workers[i].proc
        return proc is not None and proc.poll() is not None

    def close(self) -> None:
        for w in self.workers.values():
            w.kill()


def start_clients(mesh: Mesh, run_dir: Path, *, fetching: Sequence[int], watching: Sequence[int],
                  blob_id: str, sha256: str) -> Clients:
    run_dir.mkdir(parents=True)
    workers: dict[int, Worker] = {}
    for i in [*fetching, *watching]:
        argv = [sys.executable, "-m", "simulations.blob_fetch_worker", "--connect", mesh.addresses[i],
                "--mesh-key-file", str(mesh.key), "--run-dir", str(run_dir), "--name", f"n{i}",
                "--timeout", str(mesh.args.timeout)]
        argv += ["--blob-id", blob_id, "--sha256", sha256] if i in fetching else []
        worker = Worker(i, run_dir / f"n{i}-log", mesh.wrap(i, argv))
        worker.start(mesh.env)
        workers[i] = worker
    return Clients(run_dir, workers, list(fetching))


def held_share(clients: Clients) -> float:
    """Mean share of the blob the fetching nodes hold (1 for those done)."""
    shares = []
    for i in clients.fetching:
        if (clients.run_dir / f"n{i}.fetched").exists():
            shares.append(1.0)
            continue
        p = clients.read(i, "progress")
        shares.append(p["held"] / p["size"] if p and p["size"] else 0.0)
    return sum(shares) / len(shares)


def make_blob(work: Path, name: str, size: int, seed: int) -> tuple[Path, str]:
    """A file of ``size`` random bytes (seeded) and its SHA-256."""
    import numpy as np

    data = np.random.default_rng(seed).bytes(size)
    path = work / f"{name}.bin"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def one_run(mesh: Mesh, work: Path, *, link: str, case: str, k: int, holders: Sequence[int],
            fetching: Sequence[int], victim: int | None, reference: tuple[float | None, str],
            seed: int) -> Row:
    args = mesh.args
    size = int(args.size_mb * MiB)
    name = f"{link}-{case}-{k}"
    path, sha = make_blob(work, name, size, seed)
    ids = {mesh.put(i, path) for i in holders}
    path.unlink()
    if len(ids) != 1:
        raise RuntimeError(f"the holders disagree on the blob id: {ids}")
    blob_id = ids.pop()
    time.sleep(0.5)  # the holders' provider records reach the directory members
    watching = [i for i in holders if i != victim]
    clients = start_clients(mesh, work / name, fetching=fetching, watching=watching, blob_id=blob_id, sha256=sha)
    notes: dict[str, Any] = {}
    try:
        everyone = [*fetching, *watching]
        wait_for(lambda: all((clients.run_dir / f"n{i}.ready").exists() or clients.exited(i) for i in everyone),
                 60.0, what="the fetch workers to connect")
        t0 = time.time()
        (clients.run_dir / "go").touch()
        deadline = time.monotonic() + args.timeout
        while not all((clients.run_dir / f"n{i}.fetched").exists() or clients.exited(i) for i in fetching):
            if time.monotonic() > deadline:
                notes["timed_out"] = True
                break
            if victim is not None and "killed_at_s" not in notes and held_share(clients) >= args.kill_at:
                notes["held_at_kill"] = round(held_share(clients), 3)
                mesh.nodes[victim].kill()
                notes["killed_at_s"] = round(time.time() - t0, 3)
                notes["killed"] = f"n{victim}"
            time.sleep(0.02)
        (clients.run_dir / "verify").touch()
        wait_for(lambda: all(clients.exited(i) for i in everyone), 300.0, what="the fetch workers to finish")
    finally:
        clients.close()
    results = {i: clients.read(i, "json") or {"error": "no result"} for i in everyone}
    if case == "liar":
        try:
            notes["liar_chunks"] = json.loads(mesh.liar_acts.read_text())
        except (OSError, ValueError):
            notes["liar_chunks"] = None
    return _row(link=link, case=case, k=k, size=size, results=results, fetching=fetching, seeder=0,
                t0=t0, reference=reference, notes=notes)


def _delta(result: dict[str, Any], metric: str) -> float | None:
    before, after = result.get("before"), result.get("after")
    if not before or not after:
        return None
    return float(after.get(metric, 0.0)) - float(before.get(metric, 0.0))


def _row(*, link: str, case: str, k: int, size: int, results: dict[int, dict[str, Any]],
         fetching: Sequence[int], seeder: int, t0: float, reference: tuple[float | None, str],
         notes: dict[str, Any]) -> Row:
    each = [round(results[i]["t_ready"] - t0, 3) for i in fetching if "t_ready" in results[i]]
    last = max(each) if len(each) == len(fetching) else None
    ref_s, ref_name = reference
    up = _delta(results[seeder], "blob_uploaded_bytes_total") if seeder in results else None
    peers = sum(_delta(results[i], "blob_uploaded_bytes_total") or 0.0 for i in fetching)
    errors = [f"n{i}: {r['error']}" for i, r in results.items() if "error" in r]
    errors += [f"n{i}: wrong digest" for i in fetching if results[i].get("verified") is False]
    if notes.get("timed_out"):
        errors.append("timed out")
    return Row(link=link, case=case, k=k, size_bytes=size, last_s=last, each_s=sorted(each),
               reference_s=None if ref_s is None else round(ref_s, 3), reference=ref_name,
               ratio=None if last is None or not ref_s else round(last / ref_s, 3),
               seeder_uploaded_bytes=up, seeder_vs_kS=None if up is None else round(up / (k * size), 3),
               peers_uploaded_bytes=peers, verified=sum(1 for i in fetching if results[i].get("verified")),
               blamed=[_delta(results[i], "blob_blamed_total") or 0.0 for i in fetching], errors=errors, notes=notes)


def measure_link(args: argparse.Namespace, work: Path, link: str, ks: list[int], faults: list[str]) -> list[Row]:
    """Every run of one link setting, on one mesh."""
    rate = rate_bytes_per_s(link) if link != "loopback" else None
    fk = args.fault_downloaders
    downloaders = max([*ks, fk if faults else 0])
    holder = downloaders + 1 if "kill" in faults else None
    liar = downloaders + 1 + (holder is not None) if "liar" in faults else None
    count = downloaders + 1 + (holder is not None) + (liar is not None)
    size = int(args.size_mb * MiB)
    net = ShapedNet(count, rate=link) if rate else None
    rows: list[Row] = []
    try:
        if net is not None:
            net.create()
        mesh = Mesh(work / link, count=count, liar=liar, net=net, args=args)
        try:
            mesh.wait_converged()
            print(f"  {link}: {count} nodes up", file=sys.stderr, flush=True)
            reference: tuple[float | None, str] = (size / rate, "S/B") if rate else (None, "k=1 measured")
            for n, k in enumerate(ks):
                row = one_run(mesh, work, link=link, case="swarm", k=k, holders=[0], fetching=range(1, k + 1),
                              victim=None, reference=reference, seed=args.seed * 1000 + n)
                if rate is None and k == 1 and row.last_s:
                    reference = (row.last_s, "k=1 measured")
                    row.reference_s, row.ratio = row.last_s, 1.0
                rows.append(row)
                _progress(row)
            if "liar" in faults:
                assert liar is not None
                rows.append(one_run(mesh, work, link=link, case="liar", k=fk, holders=[0, liar],
                                    fetching=range(1, fk + 1), victim=None, reference=reference, seed=args.seed + 501))
                _progress(rows[-1])
            if "kill" in faults:
                assert holder is not None
                rows.append(one_run(mesh, work, link=link, case="kill", k=fk, holders=[0, holder],
                                    fetching=range(1, fk + 1), victim=0, reference=reference, seed=args.seed + 502))
                _progress(rows[-1])
        finally:
            mesh.close()
    finally:
        if net is not None:
            net.close()
    return rows


def _progress(row: Row) -> None:
    print(f"  {row.link} {row.case} k={row.k}: last {row.last_s}s, each {row.each_s}, "
          f"seeder up {_mb(row.seeder_uploaded_bytes)} MB, {row.verified}/{row.k} verified"
          + (f", errors {row.errors}" if row.errors else ""), file=sys.stderr, flush=True)


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:.0f}"


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def print_table(rows: list[Row]) -> None:
    print(f"{'link':<9}{'case':<6}{'k':>3}{'last s':>9}{'ref s':>8} {'ref':<13}{'ratio':>7}"
          f"{'seeder MB':>10}{'/ k*S':>7}{'peers MB':>9}{'verified':>9}{'blamed':>7}  notes")
    for r in rows:
        notes = ", ".join(f"{k} {v}" for k, v in r.notes.items())
        print(f"{r.link:<9}{r.case:<6}{r.k:>3}{_f(r.last_s, '.2f'):>9}{_f(r.reference_s, '.2f'):>8} "
              f"{r.reference:<13}{_f(r.ratio, '.2f'):>7}{_mb(r.seeder_uploaded_bytes):>10}"
              f"{_f(r.seeder_vs_kS, '.2f'):>7}{_mb(r.peers_uploaded_bytes):>9}{f'{r.verified}/{r.k}':>9}"
              f"{sum(1 for b in r.blamed if b):>7}  {notes}")
        for e in r.errors:
            print(f"    ERROR {e}")


def goal_lines(rows: list[Row]) -> list[str]:
    out = []
    for r in rows:
        if r.case == "swarm" and r.k == GOAL_K and r.reference == "S/B" and r.ratio is not None:
            verdict = "PASS" if r.ratio <= GOAL_RATIO else "FAIL"
            out.append(f"{verdict} the last of {GOAL_K} downloaders within {GOAL_RATIO} x S/B at {r.link}: "
                       f"{r.ratio:.2f} x ({r.last_s:.1f} s vs {r.reference_s:.1f} s)")
    return out


def run(args: argparse.Namespace) -> int:
    ks = sorted({int(k) for k in args.downloaders.split(",") if k.strip()})
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    if not ks or ks[0] < 1 or set(faults) - {"kill", "liar"} or args.size_mb <= 0:
        print("--downloaders must be positive integers, --faults some of kill,liar, --size-mb > 0", file=sys.stderr)
        return 2
    links = [s.strip().lower() for s in args.shape.split(",") if s.strip()]
    shaped = [s for s in links if s != "loopback"]
    for s in shaped:
        rate_bytes_per_s(s)  # ValueError on a bad rate, before any work
    skipped = unavailable() if shaped else None
    if skipped:
        print(f"skipping shaped links {', '.join(shaped)}: {skipped}")
        links = [s for s in links if s == "loopback"]
    if "loopback" in links and 1 not in ks:
        ks = [1, *ks]  # the loopback reference: one downloader alone
    work = args.dir or Path(tempfile.mkdtemp(prefix="starmesh-bench-blobs-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    try:
        for link in links:
            rows += measure_link(args, work, link, ks, faults)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"bench blobs: one seeder, k downloaders of a {args.size_mb:g} MiB blob of random bytes (1 MiB chunks), "
          f"real node processes, preset {args.preset}, BULK congestion control "
          f"{args.bulk_congestion or 'system'}; load average {os.getloadavg()[0]:.2f} at the end")
    print("last s: until the last downloader's node held the whole blob; ref: S/B (blob size / link rate) on "
          "shaped links, on loopback the measured time of one downloader alone (no link rate); seeder MB: what "
          "the seeder uploaded, vs k*S (serving each alone); peers MB: what downloaders uploaded to each other")
    print_table(rows)
    for line in goal_lines(rows):
        print(line)
    failed = [f"{r.link} {r.case} k={r.k}: {e}" for r in rows for e in r.errors]
    failed += [f"{r.link} {r.case} k={r.k}: {r.k - r.verified} copies not verified" for r in rows if r.verified < r.k]
    skips = {"skipped": {s: skipped for s in shaped}} if skipped else {}
    print(json.dumps({"bench": "blobs", "size_bytes": int(args.size_mb * MiB), "downloaders": ks,
                      "links": links, **skips, "goal": goal_lines(rows), "failures": failed,
                      "rows": [asdict(r) for r in rows]}, sort_keys=True))
    return 1 if failed else 0
