"""``bench tasks``: task throughput, round trip and failover with real node processes on loopback.

Each case starts a fresh mesh of ``--nodes`` processes (``simulations.nodeprocs.LocalMesh``,
preset ``--preset``, each with ``--task-slots --slots`` and ``--task-lease-s --lease-s``),
waits until every node sees all of them alive, and drives it with the asyncio client
(``node.task_client.AsyncMeshClient``) from this process. The bundle is written to a temp
dir: ``double(x) = 2 * x`` and ``sleep_then(x)``, which sleeps 0.25 s and returns ``x``.

(a) ``tiny``: a warm-up task (every node's worker pool started), then one task of ``--tiny``
    subtasks ``double``: subtasks/s from the ``map`` call to every result back; then
    ``--round-trips`` tasks of one subtask each, one after the other (after 5 unrecorded ones):
    each round trip is ``map`` + ``results``, split into the submission (until the task is
    accepted) and the wait for its result.
(b) ``worker kill``: ``--slow`` subtasks ``sleep_then`` (batch 1); ``--kill-at`` s after the
    ``map`` call, one node that is neither the task's coordinator nor the node the client
    talks to is ``kill -9``ed. Seconds to all results, against the ideal
    ``k + (n*d - k*S) / (S - s)``: all ``S`` slots busy until the kill at ``k``, the ``s`` slots
    of the dead node gone after it (``n`` subtasks of ``d`` s); the work lost in flight on it
    and the time to notice (a lease, ``--lease-s``) are what the mesh adds.
(c) ``coordinator kill``: the same with the task's coordinator ``kill -9``ed; the client talks
    to another node (it re-attaches through one when the node it submitted to turned out to
    be the coordinator). Seconds to all results, and that no result was lost or duplicated.

Every result is checked (value, ok, one per index); a wrong or missing result makes the run
exit 1. The reference column is quoted from issue 11 (Ray 2.60, Dask 2026.8 with 3 local
workers on a machine like ours), not measured here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.submitters.store import default_key_path, load_or_create_submitter_key
from node.task_client import AsyncMeshClient, AsyncTask, Result
from simulations.bench_membership import percentile
from simulations.nodeprocs import LocalMesh, NodeProcess, wait_for

JOB = textwrap.dedent('''
    import time

    def double(x):
        return 2 * x

    def sleep_then(x):
        time.sleep(0.25)
        return x
''')
MODULE = "benchjob"
SLOW_S = 0.25
"""Seconds ``sleep_then`` sleeps."""
UNRECORDED_ROUND_TRIPS = 5

#: Quoted from issue 11, not measured here: 3 local workers on a machine like ours.
REFERENCE: dict[str, dict[str, Any]] = {
    "ray_2.60": {"tiny_per_s": 1500, "round_trip_ms": 1.7, "worker_kill_after_kill_s": 5.8,
                 "worker_kill_ideal_s": 5.0,
                 "coordinator_kill": "finishes the tasks already leased (2.7x slower); every raylet "
                                     "exits 60 s later, no new work accepted"},
    "dask_2026.8": {"tiny_per_s": 750, "round_trip_ms": 11.0, "worker_kill_after_kill_s": 4.6,
                    "coordinator_kill": "cancels every future within 0.06 s (finished ones too); "
                                        "workers exit"},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=3, help="node processes (default 3)")
    parser.add_argument("--tiny", type=int, default=10_000, help="subtasks of the throughput task (a)")
    parser.add_argument("--round-trips", type=int, default=50,
                        help="single-subtask tasks timed one after another (a)")
    parser.add_argument("--slow", type=int, default=60, help=f"subtasks of {SLOW_S} s in (b) and (c)")
    parser.add_argument("--kill-at", type=float, default=1.0, help="seconds after the map call of the kill -9")
    parser.add_argument("--slots", type=float, default=1.0,
                        help="--task-slots of each node (default 1: 3 workers, as the reference)")
    parser.add_argument("--lease-s", type=float, default=2.0, help="--task-lease-s of each node")
    parser.add_argument("--preset", default="local", help="SWIM preset of the nodes (default local)")
    parser.add_argument("--cases", default="a,b,c", help="which cases to run (default a,b,c)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a task may take")
    parser.add_argument("--seed", type=int, default=1, help="seed for the entry node and victim choice")
    parser.add_argument("--dir", type=Path, default=None,
                        help="keep data dirs and node logs here (default: a temp dir, removed)")
    parser.add_argument("--json", action="store_true", help="print only the final JSON line")
    parser.add_argument("--log-level", default="INFO", help="log level of the nodes (logs kept with --dir)")


@dataclass
class Bench:
    """What every case needs: options, the bundle dir, the submitter key, the rng."""

    args: argparse.Namespace
    root: Path
    bundle: Path
    rng: random.Random
    failures: list[str]
    """Checks that did not hold (wrong, missing or duplicated results)."""

    def __post_init__(self) -> None:
        self.key = load_or_create_submitter_key(default_key_path())

    def progress(self, line: str) -> None:
        if not self.args.json:
            print(line, flush=True)

    async def client(self, mesh: LocalMesh, node: NodeProcess) -> AsyncMeshClient:
        return await AsyncMeshClient.connect(node.address, mesh_secret=mesh.secret, key=self.key, timeout=10.0)

    async def map(self, client: AsyncMeshClient, function: str, inputs: Sequence[int], **options: Any) -> AsyncTask:
        return await client.map(f"{MODULE}:{function}", inputs, bundle=self.bundle, **options)

    def check(self, case: str, results: Sequence[Result], expected: Sequence[int]) -> int:
        """Wrong, missing or duplicated results (recorded in ``failures``); 0 when all is well."""
        bad = sum(1 for r in results if not r.ok or r.index >= len(expected) or r.value != expected[r.index])
        indexes = [r.index for r in results]
        missing = len(set(range(len(expected))) - set(indexes))
        duplicated = len(indexes) - len(set(indexes))
        wrong = bad + missing + duplicated
        if wrong:
            self.failures.append(f"{case}: {bad} wrong, {missing} missing, {duplicated} duplicated "
                                 f"of {len(expected)} results")
        return wrong


def start_mesh(bench: Bench, name: str) -> LocalMesh:
    """A fresh mesh of ``--nodes`` processes that all see each other alive."""
    args = bench.args
    mesh = LocalMesh(bench.root / name, preset=args.preset)
    extra = ["--task-slots", f"{args.slots:g}", "--task-lease-s", f"{args.lease_s:g}", "--log-level", args.log_level]
    try:
        first = mesh.add(extra_args=extra)
        mesh.wait_ready([first])
        others = [mesh.add(seeds=[first.address], extra_args=extra) for _ in range(args.nodes - 1)]
        mesh.wait_ready(others)
        wait_for(lambda: all(v is not None and sum(m["state"] == "alive" for m in v["members"]) == args.nodes
                             for v in mesh.views(mesh.nodes).values()), 30,
                 what=f"{args.nodes} nodes to see each other")
    except BaseException:
        mesh.close()
        raise
    return mesh


async def warm_up(bench: Bench, client: AsyncMeshClient) -> float:
    """Seconds of a first task of one ``sleep_then`` per slot of the mesh, batch 1, so every
    node fetches the bundle and starts its worker processes."""
    t0 = time.perf_counter()
    n = max(1, round(bench.args.nodes * bench.args.slots)) * 2
    task = await bench.map(client, "sleep_then", range(n), batch=1, retries=0)
    bench.check("warm-up", await task.results(timeout=bench.args.timeout), list(range(n)))
    return time.perf_counter() - t0


async def round_trips(bench: Bench, client: AsyncMeshClient, entry: NodeProcess, n: int) -> dict[str, Any]:
    """``n`` single-subtask tasks one after another (after ``UNRECORDED_ROUND_TRIPS`` more):
    round trip = ``map`` + ``results``; percentiles in ms."""
    rtts: list[float] = []
    submits: list[float] = []
    local: list[float] = []  # round trips whose coordinator was the node the client talks to
    for i in range(UNRECORDED_ROUND_TRIPS + n):
        r0 = time.perf_counter()
        one = await bench.map(client, "double", [i], retries=0)
        r1 = time.perf_counter()
        got = await one.results(timeout=bench.args.timeout)
        r2 = time.perf_counter()
        bench.check("round trip", got, [2 * i])
        if i >= UNRECORDED_ROUND_TRIPS:
            rtts.append(r2 - r0)
            submits.append(r1 - r0)
            if one.coordinator is not None and one.coordinator.hex() == entry.node_id:
                local.append(r2 - r0)
    return {"p50_ms": _ms(percentile(rtts, 50)), "p95_ms": _ms(percentile(rtts, 95)),
            "max_ms": _ms(max(rtts) if rtts else None), "submit_p50_ms": _ms(percentile(submits, 50)),
            "coordinator_is_entry": len(local), "p50_coordinator_is_entry_ms": _ms(percentile(local, 50))}


async def tiny_case(bench: Bench, mesh: LocalMesh) -> dict[str, Any]:
    args = bench.args
    entry = mesh.nodes[bench.rng.randrange(len(mesh.nodes))]
    client = await bench.client(mesh, entry)
    try:
        cold = await warm_up(bench, client)
        fresh = await round_trips(bench, client, entry, args.round_trips)
        bench.progress(f"(a) round trip p50 {fresh['p50_ms']} ms, p95 {fresh['p95_ms']} ms over {args.round_trips}")
        t0 = time.perf_counter()
        task = await bench.map(client, "double", range(args.tiny), retries=0)
        accepted = time.perf_counter()
        results = await task.results(timeout=args.timeout)
        took = time.perf_counter() - t0
        wrong = bench.check("tiny", results, [2 * i for i in range(args.tiny)])
        status = await task.status()
        per_node = _per_worker(results, mesh)
        coordinator = _name(mesh, status.coordinator.hex())
        bench.progress(f"(a) {args.tiny} tiny subtasks in {took:.2f}s ({args.tiny / took:.0f}/s; "
                       f"submit {accepted - t0:.3f}s), per node {per_node}, coordinator {coordinator}")
        after = await round_trips(bench, client, entry, args.round_trips)
        bench.progress(f"(a) with that task retained: round trip p50 {after['p50_ms']} ms, p95 {after['p95_ms']} ms")
    finally:
        await client.close()
    return {
        "tiny_subtasks": args.tiny, "tiny_s": _r(took), "tiny_per_s": round(args.tiny / took, 1),
        "tiny_submit_s": _r(accepted - t0), "tiny_wrong": wrong, "tiny_retried": status.retried,
        "tiny_per_node": per_node, "tiny_coordinator": coordinator, "cold_first_task_s": _r(cold),
        "round_trips": args.round_trips, **{f"rtt_{k}": v for k, v in fresh.items()},
        **{f"rtt_after_tiny_{k}": v for k, v in after.items()},
    }


def ideal_with_kill(*, n: int, d: float, slots: float, lost: float, kill_at: float) -> float:
    """Seconds to run ``n`` subtasks of ``d`` s on ``slots`` slots when ``lost`` of them die at
    ``kill_at``: full speed until then, the rest of the work on the survivors (fluid bound)."""
    work = n * d
    if work <= kill_at * slots:
        return work / slots
    return kill_at + (work - kill_at * slots) / (slots - lost)


async def kill_case(bench: Bench, mesh: LocalMesh, *, victim_is_coordinator: bool) -> dict[str, Any]:
    args = bench.args
    name = "coordinator_kill" if victim_is_coordinator else "worker_kill"
    entry = mesh.nodes[bench.rng.randrange(len(mesh.nodes))]
    client = await bench.client(mesh, entry)
    watcher: AsyncMeshClient | None = None
    try:
        await warm_up(bench, client)
        t0 = time.perf_counter()
        task = await bench.map(client, "sleep_then", range(args.slow), batch=1)
        assert task.coordinator is not None
        coordinator = task.coordinator.hex()
        if victim_is_coordinator:
            victim = next(n for n in mesh.nodes if n.node_id == coordinator)
            if victim is entry:  # follow the task through another node
                watcher = await bench.client(mesh, next(n for n in mesh.nodes if n is not victim))
                task = watcher.task(task.task_id)
        else:
            victim = bench.rng.choice([n for n in mesh.nodes if n.node_id != coordinator and n is not entry])
        await asyncio.sleep(max(0.0, t0 + args.kill_at - time.perf_counter()))
        done_before = (await task.status()).done
        killed = time.perf_counter()
        victim.kill()
        results = await task.results(timeout=args.timeout)
        took = time.perf_counter() - t0
        status = await task.status()
    finally:
        await client.close()
        if watcher is not None:
            await watcher.close()
    wrong = bench.check(name, results, list(range(args.slow)))
    rerun = sum(1 for r in results if r.attempts > 1)
    slots = args.nodes * args.slots
    ideal = ideal_with_kill(n=args.slow, d=SLOW_S, slots=slots, lost=args.slots, kill_at=killed - t0)
    bench.progress(f"({'c' if victim_is_coordinator else 'b'}) {args.slow} x {SLOW_S}s, "
                   f"{'coordinator' if victim_is_coordinator else 'worker'} killed at {killed - t0:.2f}s "
                   f"({done_before} done; victim {_name(mesh, victim.node_id)}, entry {_name(mesh, entry.node_id)}, "
                   f"coordinator {_name(mesh, coordinator)}): all results at {took:.2f}s (ideal {ideal:.2f}s), "
                   f"{rerun} subtasks ran again, coordinator now {_name(mesh, status.coordinator.hex())}")
    return {
        f"{name}_s": _r(took), f"{name}_after_kill_s": _r(took - (killed - t0)),
        f"{name}_ideal_s": _r(ideal), f"{name}_over_ideal_s": _r(took - ideal),
        f"{name}_killed_at_s": _r(killed - t0), f"{name}_done_at_kill": done_before,
        f"{name}_wrong": wrong, f"{name}_retried": status.retried, f"{name}_ran_again": rerun,
        f"{name}_coordinator_changed": status.coordinator.hex() != coordinator,
    }


def _per_worker(results: Sequence[Result], mesh: LocalMesh) -> dict[str, int]:
    """Subtasks per node (``n0``, ``n1``... as the mesh started them)."""
    out: dict[str, int] = {}
    for r in results:
        name = _name(mesh, r.worker or "")
        out[name] = out.get(name, 0) + 1
    return dict(sorted(out.items()))


def _name(mesh: LocalMesh, node_id: str) -> str:
    """``n0``, ``n1``... as the mesh started them."""
    return next((f"n{i}" for i, n in enumerate(mesh.nodes) if n.node_id == node_id), "?")


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def _table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    ray, dask = REFERENCE["ray_2.60"], REFERENCE["dask_2026.8"]
    table = Table(title=f"bench tasks: {result['nodes']} nodes x {result['slots_per_node']:g} slots, "
                        f"lease {result['lease_s']:g}s, preset {result['preset']}",
                  caption="* quoted from issue 11 (3 local workers on a machine like ours), not measured here")
    table.add_column("case")
    table.add_column("metric")
    table.add_column("measured", justify="right")
    table.add_column("ideal", justify="right")
    table.add_column("Ray 2.60 *", justify="right")
    table.add_column("Dask 2026.8 *", justify="right")

    def row(case: str, metric: str, key: str, ideal: str = "", r: Any = "", d: Any = "") -> None:
        if key in result:
            value = result[key]
            table.add_row(case, metric, "-" if value is None else str(value), ideal, str(r), str(d))

    row("a", f"{result.get('tiny_subtasks', 0)} tiny subtasks/s, end to end", "tiny_per_s",
        r=f"~{ray['tiny_per_s']}", d=f"~{dask['tiny_per_s']}")
    row("a", "  seconds, map call to all results", "tiny_s")
    row("a", "  submit of the task, s", "tiny_submit_s")
    row("a", "  results wrong/missing", "tiny_wrong", "0")
    row("a", "  warm-up task on a cold mesh (2 x slots of 0.25 s), s", "cold_first_task_s")
    row("a", "round trip p50, ms (after a warm-up)", "rtt_p50_ms", r=ray["round_trip_ms"], d=dask["round_trip_ms"])
    row("a", "round trip p95, ms", "rtt_p95_ms")
    row("a", "  submit part p50, ms", "rtt_submit_p50_ms")
    row("a", "  p50 when coordinator = entry, ms", "rtt_p50_coordinator_is_entry_ms")
    row("a", "round trip p50, ms, tiny task retained", "rtt_after_tiny_p50_ms")
    row("a", "round trip p95, ms, tiny task retained", "rtt_after_tiny_p95_ms")
    for case, name, what in (("b", "worker_kill", "worker"), ("c", "coordinator_kill", "coordinator")):
        ideal = result.get(f"{name}_ideal_s")
        row(case, f"{what} kill -9: s to all results", f"{name}_s", "-" if ideal is None else str(ideal))
        ideal_after = None if ideal is None else round(ideal - result[f"{name}_killed_at_s"], 3)
        row(case, "  s after the kill", f"{name}_after_kill_s", "-" if ideal_after is None else str(ideal_after),
            *((f"{ray['worker_kill_after_kill_s']} (ideal {ray['worker_kill_ideal_s']})",
               dask["worker_kill_after_kill_s"]) if case == "b" else ("see below", "see below")))
        row(case, "  over ideal, s", f"{name}_over_ideal_s", f"<= {result['lease_s'] + 1:g} (lease + 1)")
        row(case, "  results wrong/missing/dup", f"{name}_wrong", "0")
        row(case, "  subtasks run again (attempts > 1)", f"{name}_ran_again")
    Console(width=None if sys.stdout.isatty() else 132).print(table)
    print(f"ideal (b)/(c) = k + (n*d - k*S) / (S - s): n = {result['slow_subtasks']} subtasks of d = {SLOW_S} s, "
          f"S = {result['nodes']} nodes x {result['slots_per_node']:g} slots, s = {result['slots_per_node']:g} "
          f"slots lost at the kill, k = seconds of the kill after the map call; without a kill n*d/S = "
          f"{result['slow_subtasks'] * SLOW_S / (result['nodes'] * result['slots_per_node']):.2f} s")
    print(f"coordinator kill, quoted: Ray: {ray['coordinator_kill']}; Dask: {dask['coordinator_kill']}")
    for failure in result["failures"]:
        print(f"CHECK FAILED: {failure}")


def run(args: argparse.Namespace) -> int:
    if args.nodes < 3:
        raise SystemExit("--nodes must be >= 3 (case b kills a node that is neither entry nor coordinator)")
    cases = {c.strip() for c in args.cases.split(",") if c.strip()}
    if not cases or cases - {"a", "b", "c"}:
        raise SystemExit(f"--cases {args.cases!r}: expected some of a,b,c")
    root = args.dir or Path(tempfile.mkdtemp(prefix="starmesh-bench-"))
    bundle = root / "bundle"
    bundle.mkdir(parents=True, exist_ok=True)
    (bundle / f"{MODULE}.py").write_text(JOB)
    bench = Bench(args=args, root=root, bundle=bundle, rng=random.Random(args.seed), failures=[])
    result: dict[str, Any] = {
        "bench": "tasks", "nodes": args.nodes, "slots_per_node": args.slots, "lease_s": args.lease_s,
        "preset": args.preset, "slow_subtasks": args.slow, "slow_subtask_s": SLOW_S,
    }
    try:
        for case, name in (("a", "tiny"), ("b", "worker"), ("c", "coordinator")):
            if case not in cases:
                continue
            mesh = start_mesh(bench, f"{case}-{name}")
            try:
                if case == "a":
                    result.update(asyncio.run(tiny_case(bench, mesh)))
                else:
                    result.update(asyncio.run(kill_case(bench, mesh, victim_is_coordinator=case == "c")))
            finally:
                mesh.close()
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    result["failures"] = bench.failures
    result["reference_quoted_from_issue_not_measured"] = REFERENCE
    if not args.json:
        _table(result)
    print(json.dumps(result, sort_keys=True))
    return 1 if bench.failures else 0
