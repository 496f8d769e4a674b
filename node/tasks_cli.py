"""``python -m node submit | tasks | task | results | cancel``: run work on the mesh.

``submit --bundle DIR mod:fn --inputs FILE|- [--out FILE] [--json]`` packs the bundle, signs
the submission with the person's submitter key (``--key``, default
``node.submitters.store.default_key_path()``, made on first use), submits it through the node
at ``--connect`` and waits for the task to end, with a progress bar on a terminal; it writes
one JSON line per input, in input order (``{"index", "ok": true, "value"}`` or ``{"index",
"ok": false, "error": {...}, "attempts"}``), and with ``--json`` a final summary line. Exit
codes: 0 every subtask succeeded, 1 some failed (or the mesh refused / could not be
reached), 2 bad usage. ``tasks`` lists the tasks a node knows, ``task ID`` shows one with its
subtasks, ``results ID`` prints a finished task's results again, ``cancel ID`` cancels it
(the submitter's or the mesh owner's key). Each takes ``--connect``, ``--data-dir``,
``--mesh-key-file``, ``--timeout`` like ``status``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

from node.config import ClientConfig
from protocol.errors import ConfigError, StarmeshError

T = TypeVar("T")

COMMANDS = ("submit", "tasks", "task", "results", "cancel")

_HELP = {
    "submit": "run a function over inputs on the mesh and wait for the results",
    "tasks": "list the tasks a node knows: id, function, coordinator, state, done/total, failures",
    "task": "one task: its summary and every subtask's state, attempts, worker and errors",
    "results": "the results of a finished task, again, from any node",
    "cancel": "cancel a task (its submitter's or the mesh owner's key)",
}


def build_parser(command: str) -> argparse.ArgumentParser:
    from node.cli import ClientOptions

    p = argparse.ArgumentParser(prog=f"python -m node {command}", description=_HELP[command])
    ClientOptions(command, default=ClientConfig(timeout=10.0)).add_to(p)
    if command in ("submit", "cancel"):
        p.add_argument("--key", metavar="PATH", type=Path, default=None,
                       help="your submitter key (default: $STARMESH_SUBMITTER_KEY or "
                            "~/.config/starmesh/submitter.key, made on first use)")
    if command == "submit":
        p.add_argument("function", metavar="MODULE:FUNCTION", help="the function to call once per input")
        p.add_argument("--bundle", metavar="DIR", type=Path, default=None,
                       help="a directory of Python files and small data to ship with the task")
        p.add_argument("--inputs", metavar="FILE", required=True,
                       help="one JSON value per line, each the function's argument ('-': stdin)")
        p.add_argument("--out", metavar="FILE", default="-", help="where the result lines go (default: stdout)")
        p.add_argument("--retries", type=int, default=3, help="attempts after the first, per subtask (3)")
        p.add_argument("--subtask-timeout", type=float, default=600.0, metavar="SECONDS",
                       help="wall time of one attempt of one subtask (600)")
        p.add_argument("--cpus", type=float, default=1.0, help="CPUs one subtask needs (1)")
        p.add_argument("--gpus", type=int, default=0, help="GPUs one subtask needs (0)")
        p.add_argument("--memory-mb", type=int, default=0, help="memory limit of one worker process, MB (0: none)")
        p.add_argument("--batch", type=int, default=0, help="subtasks per assignment (0: the coordinator picks)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    if command in ("task", "results", "cancel"):
        p.add_argument("task_id", metavar="ID", help="the task id (32 hex digits, as submit and tasks print)")
    if command == "results":
        p.add_argument("--out", metavar="FILE", default="-", help="where the result lines go (default: stdout)")
    if command in ("submit", "tasks", "task", "cancel"):
        p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def _read_inputs(source: str) -> list[Any]:
    try:
        stream = contextlib.nullcontext(sys.stdin) if source == "-" else open(source, encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        raise ConfigError(f"--inputs {source}: {exc.strerror or exc}") from None
    values = []
    with stream as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                values.append(json.loads(line))
            except ValueError as exc:
                raise ConfigError(f"--inputs {source} line {number}: not JSON ({exc})") from None
    return values


def _open_out(path: str) -> IO[str]:
    if path == "-":
        return sys.stdout
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--out {path}: {exc.strerror or exc}") from None


async def connect_client(client: ClientConfig, key_path: Path | None, *, need_key: bool) -> Any:
    from node.identity import load_mesh_key
    from node.submitters.store import default_key_path, load_or_create_submitter_key
    from node.task_client import AsyncMeshClient

    try:
        secret = load_mesh_key(client.mesh_key_path)
    except ConfigError as exc:
        raise ConfigError(f"{exc}\nthis command needs the mesh key of the node it asks: pass "
                          "--mesh-key-file PATH or --data-dir DIR") from None
    key = load_or_create_submitter_key(key_path or default_key_path()) if need_key else None
    return await AsyncMeshClient.connect(client.connect, mesh_secret=secret, key=key, timeout=client.timeout)


class _Progress:
    """done/total, failed, retried, rate and ETA, on stderr while it is a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self._bar: Any = None
        self._task: Any = None
        self._started = time.monotonic()

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[extra]}"), TimeRemainingColumn(),
                                 console=None, transient=False)
            self._bar.start()
            self._task = self._bar.add_task("subtasks", total=None, extra="")
        return self

    def update(self, summary: Any) -> None:
        if self._bar is None:
            return
        finished = summary.done + summary.failed
        rate = finished / max(1e-9, time.monotonic() - self._started)
        extra = f"failed {summary.failed} retried {summary.retried} {rate:.0f}/s"
        if summary.waiting_reason:
            extra += f" waiting: {summary.waiting_reason}"
        self._bar.update(self._task, total=summary.total, completed=finished, extra=extra)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


def _show_failure(result: Any) -> None:
    error = result.error or {}
    print(f"subtask {result.index} failed after {result.attempts} attempts: "
          f"{error.get('type')}: {error.get('message')}", file=sys.stderr)


async def _submit(args: argparse.Namespace, client: ClientConfig) -> int:
    from node.bundles.manifest import BundleError
    from node.task_client import summary_to_json

    inputs = _read_inputs(args.inputs)
    started = time.monotonic()
    mesh = await connect_client(client, args.key, need_key=True)
    try:
        try:
            task = await mesh.map(args.function, inputs, bundle=args.bundle, retries=args.retries,
                                  timeout=args.subtask_timeout, batch=args.batch,
                                  resources={"cpus": args.cpus, "gpus": args.gpus, "memory_mb": args.memory_mb})
        except BundleError as exc:
            raise ConfigError(f"--bundle {args.bundle}: {exc}") from None
        print(f"task {task.id} submitted ({len(inputs)} subtasks); coordinator "
              f"{task.coordinator.hex()[:16] if task.coordinator else '?'}", file=sys.stderr)
        with _Progress(not args.no_progress) as progress:
            results = await task.results(on_progress=progress.update)
        summary = await task.status()
    finally:
        await mesh.close()
    out = _open_out(args.out)
    try:
        for result in results:
            out.write(json.dumps(result.to_json()) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    failed = [r for r in results if not r.ok]
    for result in failed[:5]:
        _show_failure(result)
    if len(failed) > 5:
        print(f"... and {len(failed) - 5} more failed subtasks", file=sys.stderr)
    if args.json:
        line = summary_to_json(summary)
        line.update(task_id=task.id, subtasks=len(results), seconds=round(time.monotonic() - started, 3))
        print(json.dumps(line), flush=True)
    else:
        print(f"task {task.id}: {summary.done} done, {summary.failed} failed, {summary.retried} retried "
              f"in {time.monotonic() - started:.1f}s", file=sys.stderr)
    return 1 if failed else 0


async def _tasks(args: argparse.Namespace, client: ClientConfig) -> int:
    from node.task_client import summary_to_json

    mesh = await connect_client(client, None, need_key=False)
    try:
        summaries = await mesh.tasks()
    finally:
        await mesh.close()
    rows = [summary_to_json(s) for s in summaries]
    if args.json:
        print(json.dumps(rows))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "function", "coordinator", "state", "done/total", "failed", "retried")
    for r in rows:
        state = r["state"] + (f" ({r['waiting_reason']})" if r["waiting_reason"] else "")
        table.add_row(r["id"][:16], r["function"], r["coordinator"][:12], state,
                      f"{r['done']}/{r['total']}", str(r["failed"]), str(r["retried"]))
    Console().print(table)
    return 0


async def _task(args: argparse.Namespace, client: ClientConfig) -> int:
    from node.task_client import failure_to_json, summary_to_json

    mesh = await connect_client(client, None, need_key=False)
    try:
        task = mesh.task(args.task_id)
        summary = await task.status()
        subtasks = await task.subtasks()
    finally:
        await mesh.close()
    reports = [{"index": s.index, "state": s.state.name.lower(), "attempts": s.attempts,
                "worker": s.worker.hex() if s.worker else None,
                "error": failure_to_json(s.failure) if s.failure else None} for s in subtasks]
    if args.json:
        print(json.dumps({**summary_to_json(summary), "subtasks": reports}))
        return 0
    s = summary_to_json(summary)
    print(f"task {s['id']}  {s['function']}  {s['state']}  {s['done']}/{s['total']} done, "
          f"{s['failed']} failed, {s['retried']} retried; coordinator {s['coordinator'][:16]} (epoch {s['epoch']})")
    if s["waiting_reason"]:
        print(f"waiting: {s['waiting_reason']}")
    for r in reports:
        if r["state"] != "done" or r["attempts"] > 1:
            worker = (r["worker"] or "-")[:12]
            print(f"  subtask {r['index']}: {r['state']}, {r['attempts']} attempts, worker {worker}")
            if r["error"]:
                print(f"    {r['error']['type']}: {r['error']['message']}")
                for part in ("traceback", "stderr"):
                    if r["error"].get(part):
                        print("    " + r["error"][part].rstrip().replace("\n", "\n    "))
    return 0


async def _results(args: argparse.Namespace, client: ClientConfig) -> int:
    from node.task_client import TaskRefused
    from protocol.messages.tasks import TERMINAL_STATES, TaskErrorCode

    mesh = await connect_client(client, None, need_key=False)
    try:
        task = mesh.task(args.task_id)
        summary = await task.status()
        if summary.state not in TERMINAL_STATES:
            raise TaskRefused(TaskErrorCode.NOT_FINISHED,
                              f"task {task.id} is still {summary.state.name.lower()} "
                              f"({summary.done}/{summary.total} done)")
        results = await task.results()
    finally:
        await mesh.close()
    out = _open_out(args.out)
    try:
        for result in results:
            out.write(json.dumps(result.to_json()) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 1 if any(not r.ok for r in results) else 0


async def _cancel(args: argparse.Namespace, client: ClientConfig) -> int:
    from node.task_client import summary_to_json

    mesh = await connect_client(client, args.key, need_key=True)
    try:
        summary = await mesh.task(args.task_id).cancel()
    finally:
        await mesh.close()
    if args.json:
        print(json.dumps(summary_to_json(summary)))
    else:
        print(f"task {summary.task_id.hex()} cancelled: {summary.done}/{summary.total} had finished")
    return 0


def main(command: str, argv: Sequence[str]) -> int:
    """Run one of ``COMMANDS``; the exit code (0 ok, 1 failed, 2 bad usage)."""
    from node.cli import ClientOptions, parse_args
    from node.task_client import TaskRefused

    args = parse_args(build_parser(command), argv)
    client = ClientOptions(command, default=ClientConfig(timeout=10.0)).resolve(args)
    run = {"submit": _submit, "tasks": _tasks, "task": _task, "results": _results, "cancel": _cancel}[command]
    try:
        return _run(run(args, client))
    except TaskRefused as exc:
        print(f"error: {exc.code.name}: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    except (StarmeshError, OSError) as exc:
        if isinstance(exc, ConfigError):
            raise
        print(f"error: {command} via {client.connect}: {exc}", file=sys.stderr)
        return 1
