"""``python -m node train | jobs``: train a model on the mesh, and list the training jobs.

``train`` builds a ``JobSpec`` from its flags, signs it with the person's submitter key and
submits it through the node at ``--connect`` as a task of kind ``"train"``
(``AsyncMeshClient.train``); the mesh elects the job's coordinator, which picks the workers.
Then it follows the job: one progress line per change on stderr (step, loss, validation loss,
tokens/s, workers, wire bytes, ETA), and at the end it fetches the job's history (its
committed ``SegmentRecord`` s) and the exported model (a blob), writes ``--out DIR``
(``node.training.store.write_out``: model.safetensors, config.json, metrics.jsonl, loss.png,
sample.txt, summary.json), prints the summary and, with ``--json``, a final JSON line
(``node.training.outputs.summary``). ``--reference`` also trains the same configuration in this
process, at the job's global batch, and compares. ``--resume JOB`` starts a new job from the
newest checkpoint of ``JOB`` (its state blob, step and shard cursors); pass the same flags.
``--data FILE|DIR`` trains on a text file or a directory of token arrays instead of the
built-in text: checked and packed here (``node.training_data``; bad data exits 2 before
anything is submitted), put pinned into the blob cache of the node at ``--connect`` with copies
on up to two more members, and named in the ``JobSpec`` (``data``: the blob id); every worker's
node fetches it before it opens the job. The summary's ``data`` names it (name, kind, bytes,
sha256, blob id).

``jobs`` lists the training jobs a node knows: id, coordinator, mode, step/total, loss,
workers, tokens/s (``--json``: one object per job with ``id``, ``coordinator``, ``mode``,
``step``, ``steps``, ``loss``, ``val_loss``, ``workers``, ``tokens_s``, ``state``).

Exit codes: 0 the job finished, 1 it failed (or the mesh refused / could not be reached), 2 bad
usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from node.config import ClientConfig
from node.tasks_cli import connect_client as _client
from protocol.errors import ConfigError, StarmeshError

COMMANDS = ("train", "jobs")
MODELS = {"charlm": "node.training.runner.charlm:make_job"}
#: nanoGPT's baby GPT on tiny Shakespeare: validation loss after 2000 iterations.
NANOGPT_VAL = 1.88
_POLL_S = 1.0
#: Group changes ``jobs`` shows under each job.
RECENT_EVENTS = 4


def build_parser(command: str) -> argparse.ArgumentParser:
    from node.cli import ClientOptions

    p = argparse.ArgumentParser(prog=f"python -m node {command}", description=(
        "train a model on the mesh, data-parallel, and follow it" if command == "train"
        else "list the training jobs a node knows"))
    ClientOptions(command, default=ClientConfig(timeout=15.0)).add_to(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    if command == "jobs":
        return p
    p.add_argument("--key", metavar="PATH", type=Path, default=None,
                   help="your submitter key (default: $STARMESH_SUBMITTER_KEY or "
                        "~/.config/starmesh/submitter.key, made on first use)")
    p.add_argument("--model", choices=sorted(MODELS), default="charlm",
                   help="a built-in job (default charlm: nanoGPT's baby GPT, 804k parameters)")
    p.add_argument("--data", default="shakespeare", metavar="shakespeare|FILE|DIR",
                   help="the training data: shakespeare (built in), a text FILE, or a DIR of .npy / "
                        ".safetensors 1-D integer token arrays (read in file-name order); a file or "
                        "dir goes to the workers through the blob cache (job options data, data_kind)")
    p.add_argument("--bundle", metavar="DIR", type=Path, default=None,
                   help="a directory with your job's Python files (with --job)")
    p.add_argument("--job", metavar="MODULE:FUNCTION", default=None,
                   help="the function that returns your Job (node.training.runner.job)")
    p.add_argument("--job-arg", metavar="KEY=VALUE", action="append", default=[],
                   help="an option for the job function (repeat); for charlm e.g. batch_size=12")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps (DiLoCo: inner steps) (2000)")
    p.add_argument("--workers", default=None, metavar="MIN[-MAX]",
                   help="workers: at least MIN before it starts and in every round, at most MAX "
                        "(default 1, or N with --local N)")
    p.add_argument("--global-batch", type=int, default=0, metavar="G",
                   help="a fixed global batch: micro-batches (each the job's batch) per optimizer step "
                        "over the whole group, split over whoever is present, as hivemind's target batch "
                        "size (default 0: one micro-batch per worker, so the global batch follows the group)")
    p.add_argument("--local", type=int, default=0, metavar="N",
                   help="start a throwaway mesh of N nodes on this machine, train on it, stop it")
    p.add_argument("--mode", choices=("sync", "diloco"), default="sync",
                   help="sync: average gradients every step; diloco: every --inner-steps (sync)")
    p.add_argument("--inner-steps", type=int, default=50, help="DiLoCo's H (50)")
    p.add_argument("--outer-lr", type=float, default=0.7, help="DiLoCo's outer learning rate (0.7)")
    p.add_argument("--outer-momentum", type=float, default=0.9, help="DiLoCo's outer momentum (0.9)")
    p.add_argument("--codec", default="int8+zstd", help="all-reduce codec (int8+zstd)")
    p.add_argument("--segment-steps", type=int, default=20,
                   help="sync mode: steps per segment (group changes happen between segments) (20)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (100)")
    p.add_argument("--eval-every", type=int, default=100, help="steps between validation losses (100)")
    p.add_argument("--shards", type=int, default=64, help="virtual data shards (64)")
    p.add_argument("--seed", type=int, default=1337, help="the job's seed (1337)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: its task slots)")
    p.add_argument("--gpus-per-worker", type=int, default=0, help="GPUs each worker needs (0)")
    p.add_argument("--local-ranks", type=int, default=0, metavar="N",
                   help="processes per worker that split its micro-batches (0: one per GPU, or 1 "
                        "on the CPU; N: N gloo ranks sharing a CPU worker's cores)")
    p.add_argument("--prune", type=float, default=0.0, metavar="SPARSITY",
                   help="export: global magnitude pruning to this sparsity, then a short fine-tune")
    p.add_argument("--quantize", choices=("none", "int8"), default="none",
                   help="export: dynamic int8 quantization of the Linear layers")
    p.add_argument("--segment-timeout", type=float, default=3600.0, metavar="SECONDS",
                   help="a segment running longer fails and runs again (3600)")
    p.add_argument("--retries", type=int, default=3, help="failed segments in a row before the job fails (3)")
    p.add_argument("--resume", metavar="JOB", default=None,
                   help="start from the newest checkpoint of this job (32 hex digits)")
    p.add_argument("--out", metavar="DIR", type=Path, default=None,
                   help="write model.safetensors, config.json, metrics.jsonl, loss.png, sample.txt here")
    p.add_argument("--reference", action="store_true",
                   help="also train the same config in this process (same global batch) and compare")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    return p


def parse_workers(text: str) -> tuple[int, int]:
    """``"3"`` -> (3, 3); ``"2-8"`` -> (2, 8) (``ConfigError`` otherwise)."""
    lo, _, hi = text.partition("-")
    try:
        a, b = int(lo), int(hi or lo)
    except ValueError:
        raise ConfigError(f"--workers {text!r}: expected MIN or MIN-MAX") from None
    if not 1 <= a <= b:
        raise ConfigError(f"--workers {text!r}: expected 1 <= MIN <= MAX")
    return a, b


def parse_job_args(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--job-arg {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def job_spec(args: argparse.Namespace, *, resume: Any = None, data: dict[str, Any] | None = None) -> Any:
    """The ``JobSpec`` the flags describe (``resume``: (state, step, cursors, job) to start from;
    ``data``: the ``JobSpec.data*`` fields of a stored ``--data``, ``training_data.spec_fields``)."""
    from protocol.messages.training import ExportQuantize, JobSpec, Option

    lo, hi = parse_workers(args.workers or str(args.local or 1))
    options = parse_job_args(args.job_arg)
    fields: dict[str, Any] = {}
    if resume is not None:
        state, step, cursors, job = resume
        fields = {"resume_state": state, "resume_step": step, "resume_cursors": cursors, "resume_from": job}
    fields.update(data or {})
    try:
        return JobSpec(
            options=tuple(Option(key=k, value=v) for k, v in sorted(options.items())), steps=args.steps,
            workers_min=lo, workers_max=hi, mode=args.mode, inner_steps=args.inner_steps,
            outer_lr=args.outer_lr, outer_momentum=args.outer_momentum, codec=args.codec,
            segment_steps=args.segment_steps, checkpoint_every=args.checkpoint_every,
            eval_every=args.eval_every, shards=args.shards, seed=args.seed, gpus_per_worker=args.gpus_per_worker,
            local_ranks=args.local_ranks, threads=args.threads, prune=args.prune, batch=args.global_batch,
            quantize=ExportQuantize.INT8 if args.quantize == "int8" else ExportQuantize.NONE, **fields)
    except StarmeshError as exc:
        raise ConfigError(str(exc)) from None


def pack_data(args: argparse.Namespace) -> Any:
    """``--data``: None for the built-in text, else the checked, packed data
    (``node.training_data.Packed``; ``ConfigError`` for bad data or flags that clash with it)."""
    from node import training_data

    if args.data == "shakespeare":
        return None
    options = parse_job_args(args.job_arg)
    clash = sorted({"data", "data_kind", "text"} & set(options))
    if clash:
        raise ConfigError(f"--data {args.data}: --job-arg {', '.join(clash)} would name other data")
    packed = training_data.pack(args.data)
    try:
        if args.job is None:  # the built-in char GPT: too little data shows here, not on a worker
            problem = _charlm_fits(packed, options)
            if problem:
                raise training_data.DataError(f"--data {args.data}: {problem}")
    except BaseException:
        packed.close()
        raise
    return packed


def _charlm_fits(packed: Any, options: dict[str, str]) -> str | None:
    from node import training_data

    try:
        block = int(options.get("block_size", training_data.CHARLM_BLOCK))
        shards = int(options.get("shards", 64))
        vocab = int(options.get("vocab_size", 0))
    except ValueError:
        return None  # the job reports its own bad options
    if vocab and packed.kind == "text":
        return "vocab_size is for token data; a text's vocabulary is its characters"
    if vocab and vocab < packed.vocab:
        return f"vocab_size {vocab} is at most the largest token id {packed.vocab - 1}"
    return training_data.charlm_fits(packed.tokens, block=max(1, block), shards=max(1, shards))


async def _store_data(mesh: Any, packed: Any) -> dict[str, Any]:
    """Put ``--data`` into the blob cache of the node we talk to, with copies on up to 2 more
    members; the ``JobSpec`` fields that name it."""
    from node import training_data

    blobs = await mesh.blobs()
    try:
        stored = await training_data.store(packed, blobs, copies=min(2, max(0, len(mesh.addresses) - 1)))
    finally:
        await blobs.close()
    print(f"data {training_data.describe(packed)}: blob {stored.blob.hex()}, on {len(stored.holders)} "
          f"nodes{'; ' + stored.note if stored.note else ''}", file=sys.stderr, flush=True)
    return training_data.spec_fields(packed, stored)


def data_summary(packed: Any, spec: Any) -> dict[str, Any]:
    """The summary's ``data``: which data the job trained on (name, kind, bytes, sha256, blob)."""
    from node import training_data

    if packed is None:
        return dict(training_data.SHAKESPEARE) if spec.data is None else {"blob": spec.data.hex()}
    return {**packed.fingerprint(), "blob": spec.data.hex() if spec.data else None,
            "holders": [h.hex() for h in spec.data_holders]}


def _data_line(data: dict[str, Any]) -> str:
    sha = str(data.get("sha256") or "")[:16]
    return (f"{data.get('name', '?')} ({data.get('kind', '?')}, {int(data.get('bytes') or 0):,} bytes"
            + (f", sha256 {sha}" if sha else "") + (f", blob {str(data['blob'])[:16]}" if data.get("blob") else "")
            + ")")


async def _records(task: Any) -> list[Any]:
    from protocol.messages.tasks import decode_struct
    from protocol.messages.training import SegmentRecord

    outcomes, _ = await task.outcomes()
    return [decode_struct(SegmentRecord, o.value, what="SegmentRecord") for o in outcomes if o.ok and o.value]


def _progress(summary: Any) -> Any:
    from protocol.messages.tasks import decode_struct
    from protocol.messages.training import JobProgress

    if not summary.progress:
        return None
    try:
        return decode_struct(JobProgress, summary.progress, what="JobProgress")
    except StarmeshError:
        return None


async def _resume_point(mesh: Any, job_hex: str) -> tuple[Any, int, tuple[Any, ...], bytes]:
    from protocol.messages.training import ShardCursor

    task = mesh.task(job_hex)
    records = await _records(task)
    cursors: dict[int, int] = {}
    best = None
    for r in sorted(records, key=lambda r: r.end):
        cursors.update((c.shard, c.position) for c in r.cursors)
        if r.checkpoint:
            best = (r.state, r.end, dict(cursors))
    if best is None:
        raise ConfigError(f"--resume {job_hex}: the job has no checkpoint yet")
    state, step, at = best
    return state, step, tuple(ShardCursor(shard=k, position=v) for k, v in sorted(at.items())), task.task_id


async def _train(args: argparse.Namespace, client: ClientConfig) -> int:
    from node.training import outputs, store
    from protocol.messages.tasks import TaskState

    if (args.bundle is None) != (args.job is None) and args.job is None:
        raise ConfigError("--bundle needs --job MODULE:FUNCTION")
    function = args.job or MODELS[args.model]
    started = time.monotonic()
    job_spec(args)  # bad flags exit 2 before any connection
    packed = pack_data(args)  # and bad --data
    try:
        mesh = await _client(client, args.key, need_key=True)
    except BaseException:
        if packed is not None:
            packed.close()
        raise
    try:
        resume = await _resume_point(mesh, args.resume) if args.resume else None
        data = await _store_data(mesh, packed) if packed is not None else None
        spec = job_spec(args, resume=resume, data=data)
        task = await mesh.train(spec, function=function, bundle=args.bundle, retries=args.retries,
                                timeout=args.segment_timeout,
                                resources={"cpus": 1.0, "gpus": args.gpus_per_worker})
        print(f"job {task.id} submitted: {function}, {spec.steps} steps, mode {spec.mode}, workers "
              f"{spec.workers_min}-{spec.workers_max}; coordinator "
              f"{task.coordinator.hex()[:16] if task.coordinator else '?'}", file=sys.stderr)
        summary = await _follow(task, started=started, start_step=spec.resume_step, quiet=args.no_progress)
        records = await _records(task)
        progress = _progress(summary)
        failure = None
        if summary.state is not TaskState.DONE:
            failure = next((r.failure for r in await task.subtasks() if r.failure is not None), None)
        export = next((r.export for r in sorted(records, key=lambda r: r.end, reverse=True) if r.export), None)
        model_bytes = None
        if export is not None and args.out is not None:
            import tempfile

            blobs = await mesh.blobs()
            try:
                with tempfile.TemporaryDirectory(prefix="starmesh-model-") as tmp:
                    path = await blobs.get(export.model, out=Path(tmp) / "model.safetensors")
                    model_bytes = Path(path).read_bytes()
            finally:
                await blobs.close()
    finally:
        await mesh.close()
        if packed is not None:
            packed.close()
    wall = time.monotonic() - started
    result = outputs.summary(job=task.task_id, spec=spec, records=records, progress=progress, export=export,
                             out=str(args.out) if args.out else None, wall_s=wall)
    result["data"] = data_summary(packed, spec)
    builtin = args.job is None and args.model == "charlm"
    reference = {"nanoGPT (2000 steps)": NANOGPT_VAL} if builtin and packed is None else {}
    if args.reference and builtin:
        ref = _reference(spec, spec.batch or (len(records[-1].finished) if records else spec.workers_min),
                         {"data": str(Path(args.data).expanduser().resolve()), "data_kind": packed.kind} if packed is not None else None)
        result["reference_val_loss"] = ref
        reference = {"one process": ref, **reference}
    if args.out is not None:
        store.write_out(args.out, spec=spec, records=records, model_bytes=model_bytes, export=export,
                        summary=result, job_config=None, title=f"{function} on the mesh",
                        reference=reference)
    failed = summary.state is not TaskState.DONE
    print(f"data {_data_line(result['data'])}", file=sys.stderr)
    print(outputs.format_summary(result, reference), file=sys.stderr)
    if failed:
        why = f": {failure.type}: {failure.message}" if failure is not None else ""
        print(f"job {task.id} ended {summary.state.name.lower()}{why}", file=sys.stderr)
        if failure is not None:
            result["error"] = {"type": failure.type, "message": failure.message}
    if args.json:
        result["state"] = summary.state.name.lower()
        print(outputs.dumps(result), flush=True)
    return 1 if failed else 0


async def _train_local(args: argparse.Namespace, client: ClientConfig) -> int:
    import os

    from node.local_mesh import LocalMesh

    if not args.threads:  # the nodes share this machine's CPUs
        args.threads = max(1, (os.cpu_count() or 1) // args.local)
    print(f"starting a local mesh of {args.local} nodes ...", file=sys.stderr, flush=True)
    threads = ("--task-slots", str(args.threads)) if args.threads else ()
    async with LocalMesh(args.local, extra=threads) as mesh:
        print(f"local mesh up: {args.local} nodes on 127.0.0.1:{','.join(map(str, mesh.ports))}",
              file=sys.stderr, flush=True)
        return await _train(args, mesh.client(client.timeout))


async def _follow(task: Any, *, started: float, start_step: int, quiet: bool) -> Any:
    """Poll the job until it ends, printing a progress line when it changes."""
    from node.training import outputs
    from protocol.messages.tasks import TERMINAL_STATES

    last = ""
    shown: set[tuple[int, bytes, int]] = set()
    while True:
        try:
            summary = await task.status()
        except StarmeshError as exc:  # the node we ask may be busy or gone for a moment
            print(f"(status: {exc}; retrying)", file=sys.stderr)
            await asyncio.sleep(_POLL_S)
            continue
        p = _progress(summary)
        if p is not None and not quiet:
            line = outputs.progress_line(p, started=started, now=time.monotonic(), start_step=start_step)
            if line != last:
                print(line, file=sys.stderr, flush=True)
                last = line
            for e in p.events:  # joins, leaves, deaths, as the coordinator commits them
                if (e.change, e.node, e.step) not in shown:
                    print(f"  {outputs.event_line(e)}", file=sys.stderr, flush=True)
            # the summary holds the newest events only: one that left it never comes back
            shown = {(e.change, e.node, e.step) for e in p.events}
        if summary.state in TERMINAL_STATES:
            return summary
        await asyncio.sleep(_POLL_S)


def _reference(spec: Any, workers: int, data: dict[str, str] | None = None) -> float:
    """The same config trained in one process at the job's global batch (``workers``
    micro-batches: the job's ``batch``, or one per worker),
    in a child process (``node.training.runner.reference``: this one never imports torch);
    ``data``: the job options that name ``--data`` here (the workers read their copy of its blob)."""
    import subprocess

    options = {o.key: o.value for o in spec.options}
    options.setdefault("seed", str(spec.seed))
    options.update(data or {})
    options["batch_size"] = str(int(options.get("batch_size", "12")) * max(1, workers))
    print(f"reference: {spec.steps} steps in one process at batch {options['batch_size']} ...",
          file=sys.stderr, flush=True)
    done = subprocess.run([sys.executable, "-m", "node.training.runner.reference", "--options",
                           json.dumps(options), "--steps", str(spec.steps)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise StarmeshError(f"the one-process reference failed: {done.stderr.strip()[-2000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["val_loss"])


async def _jobs(args: argparse.Namespace, client: ClientConfig) -> int:
    from node.training import outputs

    mesh = await _client(client, None, need_key=False)
    try:
        tasks = [t for t in await mesh.tasks() if t.kind == "train"]
    finally:
        await mesh.close()
    rows = []
    for t in tasks:
        p = _progress(t)
        rows.append({
            "id": t.task_id.hex(), "coordinator": t.coordinator.hex(), "state": t.state.name.lower(),
            "function": t.function, "mode": p.mode if p else None, "step": p.step if p else 0,
            "steps": p.steps if p else None, "loss": p.loss if p else None,
            "val_loss": p.val_loss if p else None,
            "workers": [w.hex() for w in p.workers] if p else [], "tokens_s": p.tokens_s if p else 0.0,
            "listeners": [w.hex() for w in p.listeners] if p else [], "batch": p.batch if p else 0,
            "events": [outputs.event_json(e) for e in p.events] if p else [],
            "waiting": p.waiting if p else t.waiting_reason})
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    if not rows:
        print("no training jobs")
        return 0
    print(f"{'job':<34} {'coordinator':<18} {'mode':<7} {'step':>11} {'loss':>7} {'workers':>7} "
          f"{'tokens/s':>9}  state")
    for r, t in zip(rows, tasks, strict=True):
        loss = f"{r['loss']:.3f}" if r["loss"] is not None else "-"
        workers = f"{len(r['workers'])}" + (f"+{len(r['listeners'])}" if r["listeners"] else "")
        print(f"{r['id']:<34} {r['coordinator'][:16]:<18} {r['mode'] or '-':<7} "
              f"{r['step']:>5}/{r['steps'] or '?':<5} {loss:>7} {workers:>7} "
              f"{r['tokens_s']:>9.0f}  {r['state']}{' (' + r['waiting'] + ')' if r['waiting'] else ''}")
        p = _progress(t)
        for e in (p.events[-RECENT_EVENTS:] if p else ()):
            print(f"    {outputs.event_line(e)}")
    return 0


def main(command: str, argv: Sequence[str]) -> int:
    """Run ``train`` or ``jobs``; the exit code (0 ok, 1 failed, 2 bad usage)."""
    from node.cli import ClientOptions, parse_args
    from node.task_client import TaskRefused

    args = parse_args(build_parser(command), argv)
    client = ClientOptions(command, default=ClientConfig(timeout=15.0)).resolve(args)
    try:
        if command == "jobs":
            return asyncio.run(_jobs(args, client))
        if args.local:
            return asyncio.run(_train_local(args, client))
        return asyncio.run(_train(args, client))
    except TaskRefused as exc:
        print(f"error: {exc.code.name}: {exc}", file=sys.stderr)
        return 1
    except (StarmeshError, OSError) as exc:
        if isinstance(exc, ConfigError):
            raise
        print(f"error: {command} via {client.connect}: {exc}", file=sys.stderr)
        return 1
