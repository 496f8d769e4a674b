"""``bench join`` and ``bench detect``: membership timings with real node processes on loopback.

How views are observed: the bench keeps one CLIENT-channel link open to every node
(``simulations.nodeprocs.Observer``) and asks all of them for their status every
``--poll`` seconds, concurrently. Times are therefore accurate to about one poll interval.

``bench join --nodes 8 --trials 20``: each trial starts a fresh mesh (new identities): a
seed, then ``nodes - 1`` processes joining through it at once. The clock starts when the
last joiner is listening and has sent its join (``ready_at`` in its ready file) and stops
at the first poll where every node reports the same view: all ``nodes`` members alive with
the same incarnations. A trial that does not get there within ``--timeout`` is a *split*.
Also reported: the time from spawning the joiners (includes Python start-up).

``bench detect --nodes 8 --trials N``: one mesh; each trial ``kill -9``s a random non-seed
node and times until every survivor reports it dead, then restarts it (same data dir) and
waits for one identical view again. Then ``--freeze-trials`` trials freeze a random node
with SIGSTOP for ``--freeze-s`` seconds, resume it, and watch until views agree again plus
``--settle`` seconds: any member reported dead by anyone in that window is a false death.

Targets (DESIGN.md, measured here, never asserted): join p95 <= 2 s with 0 splits; kill -9
detected by all survivors p95 <= 6 s; 0 false deaths under 3 s freezes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from simulations.nodeprocs import LocalMesh, NodeProcess, Observer, View, converged, states


def add_join_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``bench join``."""
    _add_arguments(parser, "join")


def add_detect_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``bench detect``: those of ``join`` plus the freeze trials."""
    _add_arguments(parser, "detect")


def _add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--nodes", type=int, default=8, help="node processes (default 8)")
    parser.add_argument("--trials", type=int, default=20 if name == "join" else 10,
                        help="trials (join: a fresh mesh each; detect: one kill -9 each)")
    parser.add_argument("--preset", default="local", help="SWIM preset of the nodes (default local)")
    parser.add_argument("--timeout", type=float, default=10.0 if name == "join" else 20.0,
                        help="seconds a trial may take before it counts as failed")
    parser.add_argument("--poll", type=float, default=0.05, help="seconds between status polls")
    parser.add_argument("--seed", type=int, default=1, help="seed for victim choice")
    parser.add_argument("--dir", type=Path, default=None,
                        help="keep data dirs and node logs here (default: a temp dir, removed)")
    parser.add_argument("--json", action="store_true", help="print only the final JSON line")
    parser.add_argument("--log-level", default="INFO", help="log level of the nodes (logs kept with --dir)")
    if name == "detect":
        parser.add_argument("--freeze-trials", type=int, default=5, help="SIGSTOP trials (default 5)")
        parser.add_argument("--freeze-s", type=float, default=3.0, help="seconds a node stays frozen")
        parser.add_argument("--settle", type=float, default=3.0,
                            help="seconds to keep watching for deaths after views agree again")
    parser.set_defaults(_bench=name)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


async def _poll_until(obs: Observer, nodes: Sequence[NodeProcess], done: Any, *, timeout: float,
                      poll: float, on_views: Any = None) -> float | None:
    """Poll ``nodes`` until ``done(views)``; the Unix time it first held, or None on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        views = await obs.views(nodes, timeout=min(1.0, timeout))
        now = time.time()
        if on_views is not None:
            on_views(views)
        if done(views):
            return now
        await asyncio.sleep(poll)
    return None


async def _wait_ready(nodes: Sequence[NodeProcess], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(n.poll_ready() for n in nodes):
        if time.monotonic() > deadline:
            logs = "\n".join(n.log_text()[-1500:] for n in nodes if not n.poll_ready())
            raise TimeoutError(f"node processes did not start:\n{logs}")
        await asyncio.sleep(0.02)


async def _start_mesh(root: Path, args: argparse.Namespace) -> tuple[LocalMesh, float]:
    """Seed, then joiners all at once; returns the mesh and when the joiners were spawned."""
    mesh = LocalMesh(root, preset=args.preset)
    extra = ("--log-level", args.log_level)
    try:
        seed = mesh.add(extra_args=extra)
        await _wait_ready([seed])
        spawned = time.time()
        joiners = [mesh.add(seeds=[seed.address], extra_args=extra) for _ in range(args.nodes - 1)]
        await _wait_ready(joiners)
    except BaseException:
        mesh.close()
        raise
    return mesh, spawned


async def _join_trials(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    times: list[float] = []
    from_spawn: list[float] = []
    splits = 0
    for trial in range(args.trials):
        mesh, spawned = await _start_mesh(root / f"join{trial}", args)
        try:
            t0 = max(n.ready_at for n in mesh.nodes[1:])
            async with Observer(mesh.secret) as obs:
                done_at = await _poll_until(obs, mesh.nodes, _converged_on(mesh),
                                            timeout=args.timeout, poll=args.poll)
        finally:
            mesh.close()
        if done_at is None:
            splits += 1
        else:
            times.append(max(0.0, done_at - t0))
            from_spawn.append(done_at - spawned)
        _progress(args, f"join trial {trial + 1}/{args.trials}: "
                        + (f"{times[-1]:.2f}s" if done_at is not None else "SPLIT"))
    return {
        "bench": "join", "nodes": args.nodes, "trials": args.trials, "preset": args.preset,
        "p50_s": _r(percentile(times, 50)), "p95_s": _r(percentile(times, 95)),
        "max_s": _r(max(times) if times else None), "splits": splits,
        "from_spawn_p50_s": _r(percentile(from_spawn, 50)),
        "from_spawn_p95_s": _r(percentile(from_spawn, 95)),
        "target_p95_s": 2.0, "target_splits": 0,
    }


async def _kill_trial(obs: Observer, mesh: LocalMesh, victim: NodeProcess,
                      args: argparse.Namespace) -> float | None:
    survivors = [n for n in mesh.nodes if n is not victim]
    killed_at = time.time()
    victim.kill()

    def all_dead(views: dict[str, View | None]) -> bool:
        return all(v is not None and states(v).get(victim.node_id, ("?", 0))[0] == "dead"
                   for v in views.values())

    done_at = await _poll_until(obs, survivors, all_dead, timeout=args.timeout, poll=args.poll)
    victim.restart()
    await _wait_ready([victim])
    ids = [n.node_id for n in mesh.nodes]
    if await _poll_until(obs, mesh.nodes, lambda v: converged(v, ids), timeout=args.timeout,
                         poll=args.poll) is None:
        raise TimeoutError("mesh did not reconverge after a restart")
    return None if done_at is None else done_at - killed_at


async def _freeze_trial(obs: Observer, mesh: LocalMesh, target: NodeProcess,
                        args: argparse.Namespace) -> tuple[int, int]:
    """Returns (members seen dead, members seen suspect) across all views of the trial."""
    dead: set[tuple[str, str]] = set()
    suspect: set[tuple[str, str]] = set()

    def record(views: dict[str, View | None]) -> None:
        for observer, view in views.items():
            for member, (state, _) in states(view).items():
                if state == "dead":
                    dead.add((observer, member))
                elif state == "suspect":
                    suspect.add((observer, member))

    others = [n for n in mesh.nodes if n is not target]
    target.signal(signal.SIGSTOP)
    try:
        await _poll_until(obs, others, lambda v: False, timeout=args.freeze_s, poll=args.poll,
                          on_views=record)
    finally:
        target.signal(signal.SIGCONT)
    ids = [n.node_id for n in mesh.nodes]
    await _poll_until(obs, mesh.nodes, lambda v: converged(v, ids), timeout=args.timeout,
                      poll=args.poll, on_views=record)
    await _poll_until(obs, mesh.nodes, lambda v: False, timeout=args.settle, poll=args.poll,
                      on_views=record)
    return len({m for _, m in dead}), len({m for _, m in suspect})


async def _detect_trials(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    mesh, _ = await _start_mesh(root / "detect", args)
    detect: list[float] = []
    missed = 0
    false_deaths = 0
    suspected = 0
    try:
        async with Observer(mesh.secret) as obs:
            ids = [n.node_id for n in mesh.nodes]
            if await _poll_until(obs, mesh.nodes, lambda v: converged(v, ids), timeout=args.timeout,
                                 poll=args.poll) is None:
                raise TimeoutError("mesh did not converge")
            for trial in range(args.trials):
                took = await _kill_trial(obs, mesh, rng.choice(mesh.nodes[1:]), args)
                if took is None:
                    missed += 1
                else:
                    detect.append(took)
                _progress(args, f"kill trial {trial + 1}/{args.trials}: "
                                + (f"{took:.2f}s" if took is not None else "NOT DETECTED"))
            for trial in range(args.freeze_trials):
                dead, sus = await _freeze_trial(obs, mesh, rng.choice(mesh.nodes[1:]), args)
                false_deaths += dead
                suspected += sus
                _progress(args, f"freeze trial {trial + 1}/{args.freeze_trials}: "
                                f"{dead} false deaths, {sus} members suspected")
    finally:
        mesh.close()
    return {
        "bench": "detect", "nodes": args.nodes, "trials": args.trials, "preset": args.preset,
        "p50_s": _r(percentile(detect, 50)), "p95_s": _r(percentile(detect, 95)),
        "max_s": _r(max(detect) if detect else None), "undetected": missed,
        "freeze_trials": args.freeze_trials, "freeze_s": args.freeze_s,
        "false_deaths": false_deaths, "suspected_during_freezes": suspected,
        "target_p95_s": 6.0, "target_false_deaths": 0,
    }


def _converged_on(mesh: LocalMesh) -> Any:
    ids = [n.node_id for n in mesh.nodes]
    return lambda views: converged(views, ids)


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _progress(args: argparse.Namespace, line: str) -> None:
    if not args.json:
        print(line, flush=True)


def _table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"bench {result['bench']}: {result['nodes']} nodes, preset {result['preset']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.items():
        if key not in ("bench", "nodes", "preset"):
            table.add_row(key, "-" if value is None else str(value))
    Console().print(table)


def run(args: argparse.Namespace) -> int:
    if args.nodes < 3:
        raise SystemExit("--nodes must be >= 3")
    root = args.dir or Path(tempfile.mkdtemp(prefix="starmesh-bench-"))
    try:
        scenario = _join_trials if args._bench == "join" else _detect_trials
        result = asyncio.run(scenario(root, args))
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    if not args.json:
        _table(result)
    print(json.dumps(result, sort_keys=True))
    return 0
