"""``python -m simulations train``: a local mesh trains a small model, data-parallel.

Starts ``--nodes`` real worker processes on loopback (``simulations.train_worker``), each
embedding a Starmesh node through ``node.embedded.MeshNode``; the first listens, the others
join it (the plumbing of ``simulations.allreduce_procs``). Each worker trains the same MLP
on its shard of a seeded synthetic dataset and averages gradients over the mesh every step
with ``MeshGradientAverager`` (``--codec``). This process prints one progress line every
``--every`` steps (step, mean loss over the workers, bytes on the wire so far, time per step),
then the result: final training loss and held-out accuracy of the mesh run next to the same
model trained here, in one process, on the same examples (each step's batch is the union
of the workers' batches), and whether every worker ended with bit-identical parameters.

Exit status 1 if a worker failed, the loss did not decrease, or the workers diverged.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from simulations.allreduce_procs import Run, Worker, _address, child_env, finish
from simulations.train_worker import (
    build_model,
    build_optimizer,
    evaluate,
    make_dataset,
    params_digest,
    shard_batches,
    warm_up,
)

#: The loss counts as decreased when the final training loss is below this fraction of the
#: first step's mean loss.
DECREASE_FRACTION = 0.7


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=3, help="worker processes (mesh nodes)")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps")
    parser.add_argument("--batch", type=int, default=32, help="examples per worker per step")
    parser.add_argument("--codec", default="int8+zstd", help="gradient codec (none, fp16, int8+zstd, ...)")
    parser.add_argument("--seed", type=int, default=0, help="data, batch order and initial weights")
    parser.add_argument("--every", type=int, default=0, help="progress line every K steps (0: ~10 lines)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds for the whole mesh run")
    parser.add_argument("--out-dir", help="worker files (default: a temporary directory)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the result")


def run(args: argparse.Namespace) -> int:
    if args.nodes < 1 or args.steps < 1 or args.batch < 1:
        raise SystemExit("--nodes, --steps and --batch must be positive")
    from protocol.errors import ConfigError
    from protocol.tensor import CodecSpec

    try:
        CodecSpec.parse(args.codec)
    except ConfigError as exc:
        raise SystemExit(f"--codec: {exc}") from None
    if args.out_dir:
        return _run_in(Path(args.out_dir), args)
    with tempfile.TemporaryDirectory(prefix="starmesh-train-") as tmp:
        return _run_in(Path(tmp), args)


def _run_in(root: Path, args: argparse.Namespace) -> int:
    print(f"training a {args.nodes}-node mesh: {args.steps} steps, batch {args.batch}/node, "
          f"codec {args.codec}, seed {args.seed}", flush=True)
    t0 = time.monotonic()
    mesh = start_workers(root, args)
    progress = _Progress(mesh)
    try:
        startup = _show_progress(progress, args, t0)
        results = finish(mesh, args.timeout)
    except (RuntimeError, TimeoutError) as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        if args.json:
            print(json.dumps({"scenario": "train", "ok": False, "error": str(exc)[:2000]}))
        return 1
    finally:
        mesh.close()
    wall = time.monotonic() - t0
    reference = train_reference(args)
    summary = summarize(args, results, reference, wall, progress.first_losses())
    summary["startup_seconds"] = startup
    _print_result(summary)
    if args.json:
        print(json.dumps(summary))
    return 0 if summary["ok"] else 1


# --------------------------------------------------------------------------- the mesh run


def start_workers(root: Path, args: argparse.Namespace) -> Run:
    """One training worker per node; the first listens on port 0, the others join it."""
    from node.identity import create_mesh_key

    root.mkdir(parents=True, exist_ok=True)
    key = root / "mesh.key"
    if not key.exists():
        create_mesh_key(key)
    mesh, env = Run(), child_env(OMP_NUM_THREADS="1")
    for i in range(args.nodes):
        out = root / f"node{i}"
        argv = [sys.executable, "-m", "simulations.train_worker", "--rank", str(i),
                "--nodes", str(args.nodes), "--steps", str(args.steps), "--batch", str(args.batch),
                "--codec", args.codec, "--seed", str(args.seed), "--out-dir", str(out),
                "--data-dir", str(out / "data"), "--mesh-key-file", str(key),
                "--ready-file", str(out / "ready.json")]
        if i > 0:
            argv += ["--join", _address(mesh.workers[0])]
        for stale in ("ready.json", "results.json", "progress.jsonl"):
            (out / stale).unlink(missing_ok=True)
        worker = Worker(i, out, argv)
        worker.start(env)
        mesh.workers.append(worker)
    return mesh


class _Progress:
    """Tails every worker's ``progress.jsonl``; ``steps[s]`` = the records of step ``s``."""

    def __init__(self, mesh: Run) -> None:
        self.mesh = mesh
        self.offsets = [0] * len(mesh.workers)
        self.steps: dict[int, list[dict[str, Any]]] = {}

    def poll(self) -> None:
        for i, w in enumerate(self.mesh.workers):
            try:
                with open(w.out_dir / "progress.jsonl", "rb") as f:
                    f.seek(self.offsets[i])
                    chunk = f.read()
            except OSError:
                continue
            complete = chunk[:chunk.rfind(b"\n") + 1]
            self.offsets[i] += len(complete)
            for line in complete.splitlines():
                record = json.loads(line)
                self.steps.setdefault(record["step"], []).append(record)

    def done(self, step: int) -> bool:
        return len(self.steps.get(step, ())) == len(self.mesh.workers)

    def first_losses(self) -> list[float]:
        self.poll()
        return [r["loss"] for r in self.steps.get(1, [])]


def _show_progress(progress: _Progress, args: argparse.Namespace, t0: float) -> float | None:
    """Print a line every ``--every`` steps until the last step, a worker exits or time's up;
    returns the seconds from launch to the first step (None if it never came)."""
    every, shown, workers = args.every or max(1, args.steps // 10), 0, progress.mesh.workers
    started: float | None = None
    while shown < args.steps:
        progress.poll()
        if started is None and progress.done(1):
            started = time.monotonic() - t0
            print(f"  {len(workers)} nodes up and joined; training started {started:.1f}s after launch",
                  flush=True)
        while shown < args.steps and progress.done(min(shown + every, args.steps)):
            shown = min(shown + every, args.steps)
            print(_progress_line(shown, args.steps, progress.steps[shown]), flush=True)
        if any(w.proc is not None and w.proc.poll() is not None for w in workers):
            return started  # finish() reports a failure; a clean exit means the files are complete
        if time.monotonic() - t0 > args.timeout:
            return started
        time.sleep(0.05)
    return started


def _progress_line(step: int, steps: int, records: list[dict[str, Any]]) -> str:
    loss = sum(r["loss"] for r in records) / len(records)
    wire = sum(r["sent_bytes"] for r in records)
    per_step = max(r["seconds"] for r in records) / step
    return (f"  step {step:>5}/{steps}  loss {loss:7.4f}  wire {wire / 2**20:8.2f} MiB  "
            f"{per_step * 1e3:7.1f} ms/step")


# --------------------------------------------------------------------------- the reference


def train_reference(args: argparse.Namespace) -> dict[str, Any]:
    """The same model trained in this process: each step's batch is every worker's batch."""
    import torch

    torch.set_num_threads(1)
    data = make_dataset(args.seed)
    warm_up(data)
    t0 = time.perf_counter()
    model = build_model(args.seed)
    optimizer = build_optimizer(model)
    streams = [shard_batches(args.seed, r, args.nodes, args.batch) for r in range(args.nodes)]
    first_loss = 0.0
    for step in range(args.steps):
        idx = torch.cat([torch.from_numpy(next(s)) for s in streams])
        optimizer.zero_grad(set_to_none=False)
        loss = torch.nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        if step == 0:
            first_loss = loss.item()
    final_loss, accuracy = evaluate(model, data)
    return {"first_loss": first_loss, "final_loss": final_loss, "accuracy": accuracy,
            "params_sha256": params_digest(model), "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------- the result


def summarize(args: argparse.Namespace, results: list[dict[str, Any]], reference: dict[str, Any],
              wall: float, first_losses: list[float]) -> dict[str, Any]:
    digests = {r["params_sha256"] for r in results}
    first = sum(first_losses) / len(first_losses) if first_losses else reference["first_loss"]
    final = results[0]["final_loss"]
    train_s = max(r["seconds"] for r in results)
    identical = len(digests) == 1
    decreased = final < DECREASE_FRACTION * first
    return {
        "scenario": "train", "ok": identical and decreased,
        "nodes": args.nodes, "steps": args.steps, "batch_per_node": args.batch, "codec": args.codec,
        "seed": args.seed, "parameters": results[0]["parameters"],
        "first_loss": first, "final_loss": final, "accuracy": results[0]["accuracy"],
        "loss_decreased": decreased, "params_identical": identical,
        "params_sha256": sorted(digests),
        "same_as_reference": results[0]["params_sha256"] == reference["params_sha256"],
        "reference": {k: reference[k] for k in ("final_loss", "accuracy", "seconds")},
        "chance_accuracy": 1.0 / _classes(),
        "wire_bytes": sum(r["sent_bytes"] for r in results),
        # every member of a round gets the same report: worker 0's stands for all
        "partial_rounds": results[0]["partial_rounds"], "dropped": results[0]["dropped"],
        "train_seconds": train_s, "seconds_per_step": train_s / args.steps, "wall_seconds": wall,
    }


def _classes() -> int:
    from simulations.train_worker import CLASSES

    return CLASSES


def _print_result(s: dict[str, Any]) -> None:
    ref = s["reference"]
    print(f"\n{'':14}{'mesh':>12}{'1 process':>12}")
    print(f"{'train loss':14}{s['final_loss']:12.4f}{ref['final_loss']:12.4f}   (first step {s['first_loss']:.4f})")
    print(f"{'held-out acc':14}{s['accuracy']:12.2%}{ref['accuracy']:12.2%}   (chance {s['chance_accuracy']:.1%})")
    print(f"{'train time':14}{s['train_seconds']:11.2f}s{ref['seconds']:11.2f}s   "
          f"({s['seconds_per_step'] * 1e3:.1f} ms/step; wall {s['wall_seconds']:.1f}s with startup)")
    print(f"wire: {s['wire_bytes'] / 2**20:.2f} MiB sent by {s['nodes']} nodes "
          f"({s['parameters']} parameters, codec {s['codec']}); rounds missing a worker: {s['partial_rounds']}"
          f"{' ' + str(s['dropped']) if s['dropped'] else ''}")
    same = "bit-identical" if s["params_identical"] else f"DIVERGED ({len(s['params_sha256'])} distinct)"
    print(f"workers' parameters: {same} (sha256 {s['params_sha256'][0][:16]}...)"
          f"{'; equal to the 1-process model' if s['same_as_reference'] else ''}")
    verdict = "OK" if s["ok"] else "FAILED"
    reason = [] if s["loss_decreased"] else ["loss did not decrease"]
    reason += [] if s["params_identical"] else ["workers diverged"]
    print(f"{verdict}{': ' + ', '.join(reason) if reason else ''}")
