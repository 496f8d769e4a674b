"""``python -m simulations bench train``: the built-in char GPT trained by real node processes.

One mesh of ``--workers`` real ``python -m node`` processes (``--preset local``) is started,
on loopback or (``--shape``) each in its own network namespace with its link shaped both ways
by ``tc tbf`` (``simulations.netshape``, as ``bench allreduce`` / ``bench blobs`` do). Through
node 0 (in its namespace) the bench submits two jobs with ``python -m node train --json --out``
(``node.training_cli``), one after the other, every worker's training process at
``--threads`` torch threads:

``sync``
    every step's gradients averaged over the mesh with ``--codec`` (int8+zstd).
``diloco``
    ``--inner-steps`` H local AdamW steps, then one all-reduce of the pseudo-gradients and
    DiLoCo's outer Nesterov step.

Then, with the mesh stopped, the ``reference``: the same job trained in this process
(``node.training.runner.reference.train_reference`` with ``workers=W``: each step the mean
loss over W batches of the per-worker batch size, i.e. the same global batch, and the same
validation windows as the workers evaluate).

What it reports, from each job's final JSON line (``node.training.outputs.summary``) and its
``metrics.jsonl``: (a) the sync run's validation loss against the reference (goal: within 2 %);
(b) DiLoCo's against sync (goal: within 3 %), with the all-reduce rounds (sync: one per step;
DiLoCo: one per segment of H steps) and the bytes the workers sent (the summary's
``bytes_sent``, all workers together) of each (goal: ~H x fewer); (c) where the time of a step
goes: ``compute`` and ``comm`` (worker means, as the seats measure them), ``wait`` = segment
wall - compute - comm (dispatch, the training process starting, evaluation, checkpoints, the
export), per step over the whole run and over the steady segments (all but the first, which
starts the training processes, and the last, which evaluates, checkpoints and exports; waiting
for the slowest worker shows in ``comm``), and DiLoCo's compute
utilization ``compute_s / wall`` (goal >= 95 %).

``--shape wan`` is 100 Mbit/s per link (tbf). A WAN between regions also has ~50 ms of round
trip, which this kernel's tc cannot add (no netem) and for which the project has no delay
relay: the delay is NOT emulated, and the table's header and the JSON line (``link.delay_emulated``)
say so. Other ``--shape`` values are plain rates (``1gbit``). Shaping needs root and ``ip netns``;
without them the bench stops with the reason (exit 2).

Exit status: 0 when every job finished with a validation loss (the goals are reported, not
enforced: timing on a shared machine is not a pass/fail matter), 1 when one failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.submitters.keys import public_key_of
from node.submitters.store import load_or_create_submitter_key
from simulations.benchmesh import BenchMesh
from simulations.netshape import ShapedNet, rate_bytes_per_s, unavailable

#: ``--model-size`` presets: charlm job args (``--job-arg`` overrides them).
MODEL_SIZES: dict[str, dict[str, str]] = {
    "baby": {},  # nanoGPT's baby GPT: 4 layers, 4 heads, 128 wide, context 64, batch 12
    "small": {"n_layer": "2", "n_head": "4", "n_embd": "64"},
    "tiny": {"n_layer": "1", "n_head": "2", "n_embd": "32", "block_size": "16", "batch_size": "4",
             "eval_batches": "2", "sample_chars": "20"},
}
#: ``--shape`` names: rate, and the round trip a real link of that kind has (never emulated here).
SHAPES: dict[str, tuple[str, float]] = {"wan": ("100mbit", 0.050)}
GOAL_SYNC = 0.02
"""(a): sync's validation loss within 2 % of one process's."""
GOAL_DILOCO = 0.03
"""(b): DiLoCo's within 3 % of sync's."""
GOAL_UTILIZATION = 0.95
"""(c): DiLoCo's compute utilization."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps of every run (200)")
    parser.add_argument("--workers", type=int, default=3, help="node processes = workers of each job (3)")
    parser.add_argument("--inner-steps", type=int, default=50, help="DiLoCo's H (50)")
    parser.add_argument("--codec", default="int8+zstd", help="all-reduce codec of both jobs (int8+zstd)")
    parser.add_argument("--segment-steps", type=int, default=20, help="sync: steps per segment (20)")
    parser.add_argument("--modes", default="sync,diloco", help="mesh runs: sync and/or diloco (sync,diloco)")
    parser.add_argument("--no-reference", action="store_true", help="skip the one-process reference")
    parser.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="baby",
                        help="charlm preset: baby (nanoGPT's baby GPT, default), small, tiny")
    parser.add_argument("--job-arg", metavar="KEY=VALUE", action="append", default=[],
                        help="a charlm option for every run and the reference (repeat), e.g. batch_size=12")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training process (1)")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="steps between validation losses (0: only at the end)")
    parser.add_argument("--shape", nargs="?", const="wan", default="loopback",
                        help="loopback, wan (100 Mbit/s tbf; its 50 ms delay is not emulated) or a rate "
                             "(1gbit); shaped links need root and ip netns; bare --shape: wan")
    parser.add_argument("--preset", default="local", help="SWIM preset of the nodes (local)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one job may take (1800)")
    parser.add_argument("--dir", type=Path, default=None, help="keep data dirs, logs and out dirs here")


@dataclass(frozen=True)
class Link:
    name: str
    rate: str | None
    rtt_s: float | None
    """The round trip a real link of this kind has; never emulated (see the module docstring)."""

    @property
    def note(self) -> str:
        if self.rate is None:
            return "loopback, no shaping"
        text = f"{self.rate} per link both ways (tc tbf)"
        if self.rtt_s:
            text += f"; its {self.rtt_s * 1e3:.0f} ms round trip is NOT emulated (no delay relay)"
        return text

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "rate": self.rate, "rtt_s": self.rtt_s, "delay_emulated": False,
                "note": self.note}


def parse_link(text: str) -> Link:
    name = text.strip().lower()
    if name == "loopback":
        return Link(name, None, None)
    rate, rtt = SHAPES.get(name, (name, 0.0))
    rate_bytes_per_s(rate)  # ValueError on a bad rate
    return Link(name, rate, rtt or None)


def job_options(args: argparse.Namespace) -> dict[str, str]:
    options = dict(MODEL_SIZES[args.model_size])
    for item in args.job_arg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--job-arg {item!r}: expected KEY=VALUE")
        options[key] = value
    return options


class Mesh(BenchMesh):
    """``n`` node processes with one mesh key owned by a submitter key made for this bench."""

    def __init__(self, root: Path, *, n: int, net: ShapedNet | None, preset: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.submitter = root / "submitter.key"
        super().__init__(root, net=net, owner=public_key_of(load_or_create_submitter_key(self.submitter)))
        for _ in range(n):
            self.start(preset=preset, ready_s=60.0)



@dataclass
class RunResult:
    name: str
    mode: str
    steps: int = 0
    rounds: int = 0
    val_loss: float | None = None
    loss: float | None = None
    bytes_sent: int | None = None
    wall_s: float = 0.0
    """End to end: the submitter's seconds from submitting to the summary (the reference: its
    training seconds)."""
    train_s: float = 0.0
    """Sum of the segments' wall seconds (coordinator: dispatch to last report)."""
    compute_s: float = 0.0
    comm_s: float = 0.0
    tokens_s: float = 0.0
    steady: dict[str, float] = field(default_factory=dict)
    """Per step over the middle segments (``steady_per_step``): wall, compute, comm, wait, utilization."""
    error: str = ""
    summary: dict[str, Any] = field(default_factory=dict)

    def per_step(self) -> dict[str, float]:
        n = max(1, self.steps)
        wait = max(0.0, self.train_s - self.compute_s - self.comm_s)
        return {"wall": self.train_s / n, "compute": self.compute_s / n, "comm": self.comm_s / n,
                "wait": wait / n, "utilization": self.compute_s / self.train_s if self.train_s > 0 else 0.0}

    def as_json(self) -> dict[str, Any]:
        keep = ("job", "segments", "workers", "tokens", "steps_total", "val_step")
        return {"mode": self.mode, "steps": self.steps, "rounds": self.rounds, "val_loss": self.val_loss,
                "loss": self.loss, "bytes_sent": self.bytes_sent, "wall_s": self.wall_s,
                "train_s": self.train_s, "compute_s": self.compute_s, "comm_s": self.comm_s,
                "tokens_s": self.tokens_s, "per_step": self.per_step(), "steady_per_step": self.steady,
                "error": self.error, **{k: self.summary.get(k) for k in keep if k in self.summary}}


def segments(metrics: Path) -> list[dict[str, float]]:
    """Each segment's wall, compute and comm seconds and steps, from a job's ``metrics.jsonl``
    (the last step row of a segment carries its figures; wall times are cumulative)."""
    out: list[dict[str, float]] = []
    clock, first = 0.0, 0
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if "loss" in row and first == 0:
            first = row["step"]
        if "compute_s" in row:
            out.append({"wall": row["wall_s"] - clock, "compute": row["compute_s"], "comm": row["comm_s"],
                        "steps": row["step"] - first + 1})
            clock, first = row["wall_s"], 0
    return out


def steady_per_step(segs: list[dict[str, float]]) -> dict[str, float]:
    """Per step over the middle segments: not the first (the training processes start, the job
    is built) nor the last (evaluation, checkpoint, export); with fewer than 3, all but the first."""
    rest = segs[1:-1] if len(segs) >= 3 else segs[1:]
    steps = sum(s["steps"] for s in rest)
    if not steps:
        return {}
    wall, compute, comm = (sum(s[k] for s in rest) for k in ("wall", "compute", "comm"))
    return {"wall": wall / steps, "compute": compute / steps, "comm": comm / steps,
            "wait": max(0.0, wall - compute - comm) / steps, "utilization": compute / wall if wall > 0 else 0.0,
            "segments": len(rest)}


def train_on_mesh(mesh: Mesh, work: Path, mode: str, args: argparse.Namespace,
                  options: dict[str, str]) -> RunResult:
    out = work / f"out-{mode}"
    flags = ["train", "--model", "charlm", "--steps", str(args.steps), "--workers", str(args.workers),
             "--mode", mode, "--inner-steps", str(args.inner_steps), "--codec", args.codec,
             "--segment-steps", str(args.segment_steps), "--threads", str(args.threads),
             "--eval-every", str(args.eval_every or args.steps), "--checkpoint-every", str(args.steps),
             "--segment-timeout", str(args.timeout), "--key", str(mesh.submitter), "--out", str(out),
             "--json", "--no-progress", "--timeout", "60"]
    for key, value in sorted(options.items()):
        flags += ["--job-arg", f"{key}={value}"]
    print(f"  {mode}: {' '.join(flags)}", file=sys.stderr, flush=True)
    began = time.monotonic()
    result = RunResult(mode, mode)
    try:
        done = mesh.cli(0, *flags, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        result.error = f"timed out after {args.timeout:.0f} s"
        return result
    (work / f"train-{mode}.log").write_text(done.stdout + done.stderr)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        result.error = f"exit {done.returncode}: {done.stderr.strip()[-1500:]}"
        return result
    s: dict[str, Any] = json.loads(lines[-1])
    result.summary = s
    result.steps = int(s["steps"])
    result.rounds = result.steps if mode == "sync" else int(s["segments"])
    result.val_loss, result.loss = s.get("val_loss"), s.get("loss")
    result.bytes_sent = int(s["bytes_sent"])
    result.wall_s = float(s.get("wall_s") or time.monotonic() - began)
    result.train_s, result.compute_s, result.comm_s = (float(s[k]) for k in ("train_s", "compute_s", "comm_s"))
    result.tokens_s = float(s.get("tokens_s") or 0.0)
    try:
        result.steady = steady_per_step(segments(out / "metrics.jsonl"))
    except (OSError, ValueError, KeyError):
        result.steady = {}
    if result.val_loss is None:
        result.error = "no validation loss"
    return result


def train_reference(args: argparse.Namespace, options: dict[str, str]) -> RunResult:
    import torch

    from node.training.runner import charlm, reference

    torch.set_num_threads(args.threads)
    opts = dict(options)
    opts.setdefault("seed", "1337")  # python -m node train's default --seed, which the workers use
    print(f"  reference: {args.steps} steps in this process, {args.workers} batches per step",
          file=sys.stderr, flush=True)
    ref = reference.train_reference(charlm.make_job(opts), args.steps, workers=args.workers)
    tail = ref.losses[-10:]
    return RunResult("reference", "1 process", steps=args.steps, val_loss=ref.val_loss,
                     loss=sum(tail) / len(tail), wall_s=ref.seconds, train_s=ref.seconds,
                     compute_s=ref.seconds, tokens_s=ref.tokens_per_s)


def checks(runs: dict[str, RunResult], h: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    ref, sync, dil = runs.get("reference"), runs.get("sync"), runs.get("diloco")

    def close(a: RunResult | None, b: RunResult | None, goal: float, name: str, what: str) -> None:
        if a and b and a.val_loss is not None and b.val_loss is not None:
            ratio = a.val_loss / b.val_loss
            out.append({"check": name, "what": what, "value": round(ratio, 4), "goal": f"<= {1 + goal:g}",
                        "pass": abs(ratio - 1) <= goal})

    close(sync, ref, GOAL_SYNC, "a", "sync val_loss / one process val_loss")
    close(dil, sync, GOAL_DILOCO, "b", "diloco val_loss / sync val_loss")
    if sync and dil and dil.rounds and dil.bytes_sent and not sync.error and not dil.error:
        assert sync.bytes_sent is not None
        for what, value in (("rounds", sync.rounds / dil.rounds), ("bytes", sync.bytes_sent / dil.bytes_sent)):
            out.append({"check": "b", "what": f"sync {what} / diloco {what}", "value": round(value, 2),
                        "goal": f">= {0.9 * h:g} (~H)", "pass": value >= 0.9 * h})
    if dil and not dil.error:
        util = dil.per_step()["utilization"]
        out.append({"check": "c", "what": "diloco compute utilization (compute_s / wall)", "value": round(util, 4),
                    "goal": f">= {GOAL_UTILIZATION:g}", "pass": util >= GOAL_UTILIZATION})
        if dil.steady:
            util = dil.steady["utilization"]
            out.append({"check": "c", "what": "diloco steady utilization (middle segments)",
                        "value": round(util, 4), "goal": f">= {GOAL_UTILIZATION:g}", "pass": util >= GOAL_UTILIZATION})
    return out


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def print_table(runs: dict[str, RunResult], link: Link, base: float | None) -> None:
    print(f"{'run':<10}{'mode':<10}{'steps':>6}{'rounds':>7}{'val loss':>9}{'vs ref':>7}{'train':>7}"
          f"{'MB sent':>9}{'wall s':>8}{'tok/s':>7} | per step ms: {'wall':>6}{'comp':>6}{'comm':>6}{'wait':>6}"
          f"{'util':>6} | steady: {'wall':>6}{'comp':>6}{'comm':>6}{'wait':>6}{'util':>6}")
    for r in runs.values():
        p, st = r.per_step(), r.steady
        ratio = r.val_loss / base if base and r.val_loss is not None else None
        mb = None if r.bytes_sent is None else r.bytes_sent / 1e6
        steady = (f"{st['wall'] * 1e3:>6.0f}{st['compute'] * 1e3:>6.0f}{st['comm'] * 1e3:>6.0f}"
                  f"{st['wait'] * 1e3:>6.0f}{st['utilization']:>6.1%}" if st else f"{'-':>30}")
        print(f"{r.name:<10}{r.mode:<10}{r.steps:>6}{r.rounds or '-':>7}{_f(r.val_loss, '.4f'):>9}"
              f"{_f(ratio, '.3f'):>7}{_f(r.loss, '.3f'):>7}{_f(mb, '.2f'):>9}{r.wall_s:>8.1f}{r.tokens_s:>7.0f}"
              f" | {'':>13}{p['wall'] * 1e3:>6.0f}{p['compute'] * 1e3:>6.0f}{p['comm'] * 1e3:>6.0f}"
              f"{p['wait'] * 1e3:>6.0f}{p['utilization']:>6.1%} | {'':>8}{steady}")
        if r.error:
            print(f"    ERROR {r.error}")
    print(f"link: {link.name}: {link.note}")


def run(args: argparse.Namespace) -> int:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if set(modes) - {"sync", "diloco"} or args.steps < 1 or args.workers < 1 or args.inner_steps < 1:
        print("--modes: some of sync,diloco; --steps, --workers, --inner-steps >= 1", file=sys.stderr)
        return 2
    try:
        link = parse_link(args.shape)
    except ValueError as exc:
        print(f"--shape: {exc}", file=sys.stderr)
        return 2
    if link.rate and (why := unavailable()):
        print(f"--shape {link.name}: cannot shape links here: {why}", file=sys.stderr)
        return 2
    options = job_options(args)
    load_start = os.getloadavg()
    work = args.dir or Path(tempfile.mkdtemp(prefix="starmesh-bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    runs: dict[str, RunResult] = {}
    net = ShapedNet(args.workers, rate=link.rate) if link.rate else None
    try:
        if net is not None:
            net.create()
        if modes:
            mesh = Mesh(work / "mesh", n=args.workers, net=net, preset=args.preset)
            try:
                mesh.wait_converged(observers=[0])
                print(f"  {args.workers} nodes up ({link.name})", file=sys.stderr, flush=True)
                for mode in modes:
                    runs[mode] = train_on_mesh(mesh, work, mode, args, options)
                    print(f"  {mode}: val_loss {runs[mode].val_loss} {runs[mode].error}", file=sys.stderr, flush=True)
            finally:
                mesh.close()
    finally:
        if net is not None:
            net.close()
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    if not args.no_reference:
        runs = {"reference": train_reference(args, options), **runs}
    load_end = os.getloadavg()
    base = runs["reference"].val_loss if "reference" in runs else None
    print(f"bench train: charlm {args.model_size} {options or ''}, {args.workers} workers (real node processes, "
          f"preset {args.preset}, {args.threads} torch thread(s) each), {args.steps} steps, codec {args.codec}, "
          f"sync segments of {args.segment_steps}, DiLoCo H={args.inner_steps}; reference: one process, "
          f"{args.workers} batches a step; load average {load_start[0]:.2f} at the start, {load_end[0]:.2f} at "
          f"the end, {os.cpu_count()} CPUs")
    print("per step: wall = segment wall (coordinator) / steps; comp, comm: worker means as the seats measure "
          "them; wait = wall - comp - comm; util = comp / wall; steady: middle segments (not the first: processes "
          "start; nor the last: evaluation, checkpoint, export); MB sent: all workers")
    print_table(runs, link, base)
    results = checks(runs, args.inner_steps)
    for c in results:
        print(f"{'PASS' if c['pass'] else 'FAIL'} ({c['check']}) {c['what']}: {c['value']} (goal {c['goal']})")
    failures = [f"{r.name}: {r.error}" for r in runs.values() if r.error]
    print(json.dumps({"bench": "train", "link": link.as_json(), "model_size": args.model_size,
                      "job_args": options, "workers": args.workers, "steps": args.steps,
                      "inner_steps": args.inner_steps, "codec": args.codec, "threads": args.threads,
                      "load_avg": {"start": list(load_start), "end": list(load_end)}, "cpus": os.cpu_count(),
                      "runs": {k: r.as_json() for k, r in runs.items()}, "checks": results,
                      "failures": failures}, sort_keys=True))
    return 1 if failures else 0
