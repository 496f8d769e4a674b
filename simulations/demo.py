"""``python -m simulations demo``: a local mesh on loopback, shown as a live table, then training.

Part one starts ``--nodes`` real ``python -m node`` processes (one seed, the rest join through it),
waits until every node sees every other alive, then ``kill -9``s one node and waits until
every survivor has marked it dead, then stops one more with SIGTERM and waits until the
rest show it as *left*. The table has one row per member and one column per observing
node, so disagreement between views is visible as it happens. Ends with a summary of how
long each phase took. Part two (skip it with ``--no-train``) is ``python -m simulations
train`` on its defaults: a fresh mesh of worker processes trains a small classifier
data-parallel, averaging int8+zstd-compressed gradients over the mesh each step, with
progress lines and a result compared against the same model trained in one process.
Exits non-zero if a phase missed its deadline or training failed.
"""

from __future__ import annotations

import argparse
import json
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from simulations.nodeprocs import LocalMesh, NodeProcess, View, states

_STYLE = {"alive": "green", "suspect": "yellow", "dead": "bold red", "left": "dim"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=5, help="node processes to start (>= 3)")
    parser.add_argument("--preset", default="local", help="SWIM timing preset of the nodes")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds allowed per phase")
    parser.add_argument("--dir", type=Path, default=None, help="where nodes keep data dirs and logs (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print a final JSON line with the phase times")
    parser.add_argument("--no-train", action="store_true", help="skip part two (data-parallel training over a mesh)")


def render(mesh: LocalMesh, views: dict[str, View | None], phase: str) -> Group:
    observers = [n for n in mesh.nodes if n.node_id]
    table = Table(title=f"Starmesh demo - {phase}", caption="cell: state/incarnation as seen by each node (column)")
    table.add_column("member")
    table.add_column("address")
    for i, _ in enumerate(observers):
        table.add_column(f"n{i}", justify="center")
    for member in observers:
        row: list[Text | str] = [member.node_id[:10], member.address]
        for obs in observers:
            view = views.get(obs.node_id)
            if view is None:
                row.append(Text("down", style="dim"))
                continue
            state, inc = states(view).get(member.node_id, ("-", 0))
            row.append(Text(f"{state}/{inc}", style=_STYLE.get(state, "")))
        table.add_row(*row)
    return Group(table)


def _agreed(views: dict[str, View | None], observers: list[NodeProcess], target: NodeProcess, state: str) -> bool:
    return all(states(views.get(o.node_id)).get(target.node_id, ("", 0))[0] == state for o in observers)


def _phase(
    mesh: LocalMesh,
    live: Live,
    name: str,
    observers: list[NodeProcess],
    done: Callable[[dict[str, View | None]], bool],
    timeout: float,
) -> float:
    """Poll every node's view until ``done``; returns seconds taken (raises on timeout)."""
    start = time.monotonic()
    while True:
        views = mesh.views(mesh.nodes, timeout=1.0)
        live.update(render(mesh, views, name))
        if done({o.node_id: views.get(o.node_id) for o in observers}):
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"phase {name!r} did not finish within {timeout}s")
        time.sleep(0.2)


def run(args: argparse.Namespace) -> int:
    if args.nodes < 3:
        raise SystemExit("--nodes must be at least 3")
    console = Console()
    with tempfile.TemporaryDirectory(prefix="starmesh-demo-") as tmp:
        root = args.dir or Path(tmp)
        mesh = LocalMesh(root, preset=args.preset)
        results: dict[str, Any] = {"nodes": args.nodes}
        try:
            seed = mesh.add()
            mesh.wait_ready([seed])
            others = [mesh.add(seeds=[seed.address]) for _ in range(args.nodes - 1)]
            mesh.wait_ready(others)
            console.print(f"[bold]{args.nodes} nodes listening[/] (data dirs and logs under {root})")
            with Live(console=console, refresh_per_second=8, transient=False) as live:
                everyone = list(mesh.nodes)

                def all_alive(views: dict[str, View | None]) -> bool:
                    return all(_agreed(views, everyone, t, "alive") for t in everyone)

                results["join_s"] = _phase(mesh, live, "joining", everyone, all_alive, args.timeout)
                victim, leaver = mesh.nodes[-1], mesh.nodes[-2]
                victim.kill()
                survivors = [n for n in everyone if n is not victim]
                results["detect_s"] = _phase(
                    mesh, live, f"kill -9 {victim.node_id[:10]}: detecting", survivors,
                    lambda v: _agreed(v, survivors, victim, "dead"), args.timeout,
                )
                leaver.signal(signal.SIGTERM)
                rest = [n for n in survivors if n is not leaver]
                results["leave_s"] = _phase(
                    mesh, live, f"SIGTERM {leaver.node_id[:10]}: leaving", rest,
                    lambda v: _agreed(v, rest, leaver, "left"), args.timeout,
                )
                assert leaver.proc is not None
                results["leaver_exit_code"] = leaver.proc.wait(5)
        except TimeoutError as exc:
            console.print(f"[bold red]{exc}[/]")
            return 1
        finally:
            for node in mesh.nodes:
                node.stop(timeout=3.0)
            mesh.close()  # the status links ``mesh.views`` kept open
    console.print()
    console.print(
        f"[bold green]Result:[/] {args.nodes} nodes agreed on one view in {results['join_s']:.2f} s; "
        f"kill -9 detected by every survivor in {results['detect_s']:.2f} s; "
        f"graceful leave seen by all in {results['leave_s']:.2f} s (exit code {results['leaver_exit_code']})."
    )
    if args.json:
        print(json.dumps(results))
    if args.no_train:
        return 0
    return _train(console)


def _train(console: Console) -> int:
    from simulations import train

    console.print()
    console.rule("[bold]Part two: data-parallel training over a fresh local mesh")
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    return train.run(parser.parse_args([]))
