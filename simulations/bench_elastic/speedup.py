"""``bench elastic --part speedup``: time to a fixed validation loss with N equal slow machines.

For each mode (``--modes``: sync, diloco) and each N of ``--workers`` (1, 2, 4, 8), a fresh
``EmulatedCluster`` of N node processes, each capped to ``--cap`` cores (one cgroup per node: its
node process, its task processes, its training process) with its link shaped to ``--shape``
(tbf), trains the built-in char GPT with ``python -m node train --workers N``, every run at the
same global batch and constant learning rate (charlm's AdamW 1e-3), so every N follows the same
optimization and only the time differs. The global batch is ``--global-batch G`` micro-batches
of the job's batch size (12 sequences) per optimizer step (DiLoCo: per inner step), split over
the workers (``--split``):

``global-batch``
    ``train --global-batch G``: each worker accumulates its share of G micro-batches.
``batch-size``
    each worker's batch is ``G x 12 / N`` sequences (``--job-arg batch_size=``), which is the
    same global batch; ``eval_batches`` is set so the validation windows (charlm draws
    ``eval_batches x batch_size`` of them, seeded) are the same set for every run.
``auto`` (default)
    ``global-batch`` if this checkout's ``train`` has the flag, else ``batch-size``.

Then N=1 once more at each global batch of ``--single-batches`` (default 1 micro-batch): one
machine at its own best batch, the fair baseline of the claim (a small batch reaches an early
target in fewer sequences). With the flag a single-batch run still passes ``--global-batch``.

Time to target, from each job's ``metrics.jsonl`` (``node.training.outputs``: validation rows
``{step, val_loss, wall_s}``, ``wall_s`` the coordinator's clock summed over segments, from the
first segment's dispatch, which includes starting the training processes; the gaps between
segments, from a segment's last report to the next one's dispatch (commit, copies to the
coordinator's successors, planning), are not on it: the table's ``train s`` (that clock's total)
against ``wall s`` (the submitter's, from before the job was submitted) shows what they, the
submission and the export add): the wall seconds at
which the validation loss reaches ``--target``, linearly interpolated between the last
evaluation above it and the first at or below it (``interpolated``; a convex falling curve lies
below its chord, so this errs late); ``first`` is that first evaluation's wall seconds. Runs
that never reach the target have none. Speed-up = T(1 worker, same batch) / T(N); saved =
1 - T(N) / T(1). Both are also given against the best single-machine run (the smallest T of
N=1 at every batch). The goal: 8 workers save >= 80 % of the time (``GOAL_SAVED``).

Also per run: the CPU each node's cgroup used over the job (share of its cap: near 100 % means
the cap was the limit; well below, the node waited: on the network, on others, or on this
machine's cores, which other processes share) and a check that every node's training process
ran in its node's cgroup (``/proc/PID/cgroup``, sampled each second while the job ran).

Caps and shaping need root; without it the part prints why and skips (exit 0, and a JSON line
with ``skipped``). ``--cap 0 --shape loopback`` runs uncapped on loopback, without root.
Exit status: 0 when every job finished, 1 when one failed (the goal is reported, not enforced).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from simulations.bench_elastic.cluster import (
    CgroupWatch,
    EmulatedCluster,
    read_metrics,
)
from simulations.bench_elastic.common import link_rate, parse_modes, skipped, workspace
from simulations.bench_train import MODEL_SIZES
from simulations.nodeprocs import REPO_ROOT

GOAL_SAVED = 0.80
"""The bar: 8 emulated machines reach the target in >= 80 % less time than one."""
GOAL_WORKERS = 8
BATCH = 12
"""charlm's batch size (sequences per micro-batch) unless ``--job-arg batch_size=``."""
EVAL_BATCHES = 20
"""charlm's ``eval_batches`` unless ``--job-arg eval_batches=``."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", type=float, default=2.0, help="speedup: the validation loss to reach (2.0)")
    parser.add_argument("--global-batch", type=int, default=8, metavar="G",
                        help="speedup: micro-batches (of the job's batch, 12 sequences) per step for every N (8)")
    parser.add_argument("--single-batches", default="1", metavar="G,...",
                        help="speedup: N=1 again at these global batches, its own best (1; '' for none)")
    parser.add_argument("--split", choices=("auto", "global-batch", "batch-size"), default="auto",
                        help="speedup: how G is split over the workers (module docstring) (auto)")
    parser.add_argument("--steps", type=int, default=600, help="speedup: optimizer steps of every run (600)")
    parser.add_argument("--single-steps", type=int, default=0,
                        help="speedup: steps of the N=1 runs at --single-batches (0: as many sequences "
                             "as the others, --steps x G / its G)")
    parser.add_argument("--eval-every", type=int, default=50,
                        help="speedup: steps between validation losses (sync: a multiple of --segment-steps) (50)")
    parser.add_argument("--plot", default="elastic_speedup.png", metavar="PNG",
                        help="speedup: validation loss against wall seconds per N, a PNG ('': none) (elastic_speedup.png)")


# ------------------------------------------------------------------------------ pure parts


class Crossing(NamedTuple):
    interpolated: float
    """Wall seconds at which the validation loss reaches the target, interpolated."""
    first: float
    """Wall seconds of the first evaluation at or below the target."""
    step: int
    """That evaluation's step."""


def time_to_target(rows: Sequence[dict[str, Any]], target: float) -> Crossing | None:
    """When the validation rows (``{step, val_loss, wall_s}``, step order) reach ``target``
    (module docstring); None if they never do."""
    last: tuple[float, float] | None = None
    for row in rows:
        val = row.get("val_loss")
        if val is None or not math.isfinite(val):
            continue
        wall = float(row["wall_s"])
        if val <= target:
            at = wall
            if last is not None and last[1] > val:
                w0, v0 = last
                at = w0 + (v0 - target) / (v0 - val) * (wall - w0)
            return Crossing(at, wall, int(row["step"]))
        last = (wall, float(val))
    return None


def parse_counts(text: str, what: str) -> list[int]:
    """``"1,2,4,8"`` -> [1, 2, 4, 8] (``ValueError`` naming ``what`` unless all positive)."""
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} {text!r}: expected comma-separated integers") from None
    if any(x < 1 for x in out):
        raise ValueError(f"{what} {text!r}: every value must be at least 1")
    return out


class Split(NamedTuple):
    """One run's batch: what ``train`` gets to make ``g`` micro-batches a step over ``n`` workers."""

    g: int
    n: int
    flags: tuple[str, ...]
    """``--global-batch G`` or ``()``."""
    job_args: dict[str, str]
    """``batch_size`` / ``eval_batches`` overrides (the ``batch-size`` split), or {}."""


def eval_windows(batches: Sequence[int], *, batch: int, eval_batches: int) -> int:
    """Validation windows every run can draw whole batches of: the job's own ``batch x
    eval_batches``, rounded up to a multiple of every per-worker batch in ``batches``."""
    step = math.lcm(*batches)
    return step * -(-batch * eval_batches // step)


def splits(runs: Sequence[tuple[int, int]], *, how: str, batch: int, eval_batches: int) -> list[Split]:
    """The batch of each run ``(g, n)``: ``how`` is ``global-batch`` or ``batch-size``."""
    if how == "global-batch":
        return [Split(g, n, ("--global-batch", str(g)), {}) for g, n in runs]
    for g, n in runs:
        if batch * g % n:
            raise ValueError(f"--split batch-size: {g} x {batch} sequences do not split over {n} workers")
    per = [batch * g // n for g, n in runs]
    windows = eval_windows(per, batch=batch, eval_batches=eval_batches)
    return [Split(g, n, (), {"batch_size": str(b), "eval_batches": str(windows // b)})
            for (g, n), b in zip(runs, per, strict=True)]


def has_global_batch() -> bool:
    """Whether this checkout's ``python -m node train`` takes ``--global-batch``."""
    done = subprocess.run([sys.executable, "-m", "node", "train", "--help"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    return "--global-batch" in done.stdout


@dataclass
class Run:
    mode: str
    n: int
    g: int
    label: str
    """``same`` (the global batch of every N) or ``single`` (N=1 at another batch)."""
    steps: int = 0
    val: list[dict[str, Any]] = field(default_factory=list)
    """The validation rows of ``metrics.jsonl``."""
    crossing: Crossing | None = None
    val_loss: float | None = None
    train_s: float = 0.0
    wall_s: float = 0.0
    cpu: dict[str, Any] = field(default_factory=dict)
    cgroups: dict[str, Any] = field(default_factory=dict)
    job_args: dict[str, str] = field(default_factory=dict)
    error: str = ""

    @property
    def name(self) -> str:
        return f"N={self.n}" + ("" if self.label == "same" else f" G={self.g}")

    def as_json(self) -> dict[str, Any]:
        c = self.crossing
        return {"mode": self.mode, "workers": self.n, "global_batch": self.g, "run": self.label,
                "steps": self.steps, "t_target_s": c.interpolated if c else None,
                "t_first_eval_s": c.first if c else None, "step_target": c.step if c else None,
                "val_loss": self.val_loss, "train_s": self.train_s, "wall_s": self.wall_s, "cpu": self.cpu,
                "cgroups": self.cgroups, "job_args": self.job_args, "error": self.error,
                "val": [[r["step"], r["wall_s"], r["val_loss"]] for r in self.val]}


def speedups(runs: Sequence[Run]) -> dict[str, dict[int, dict[str, float]]]:
    """Per mode, per N of the ``same`` runs: T(N), speed-up and time saved against N=1 at the same
    batch (``speedup``, ``saved``) and against the best N=1 run (``speedup_best``, ``saved_best``)."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for mode in dict.fromkeys(r.mode for r in runs):
        mine = [r for r in runs if r.mode == mode and r.crossing is not None]
        base = next((r.crossing.interpolated for r in mine if r.n == 1 and r.label == "same" and r.crossing), None)
        singles = [r.crossing.interpolated for r in mine if r.n == 1 and r.crossing]
        best = min(singles) if singles else None
        rows: dict[int, dict[str, float]] = {}
        for r in mine:
            if r.label != "same" or r.crossing is None:
                continue
            t = r.crossing.interpolated
            row = {"t_s": t}
            if base:
                row.update(speedup=base / t, saved=1 - t / base)
            if best:
                row.update(speedup_best=best / t, saved_best=1 - t / best)
            rows[r.n] = row
        out[mode] = rows
    return out


# ------------------------------------------------------------------------------ running


def steps_of(args: argparse.Namespace, split: Split) -> int:
    """``--steps``, or for an N=1 run at another batch ``--single-steps`` (default: the same
    sequences, ``--steps x G / g``)."""
    if split.g == args.global_batch:
        return int(args.steps)
    return int(args.single_steps) or max(1, args.steps * args.global_batch // split.g)


def train_flags(args: argparse.Namespace, mode: str, split: Split, key: Path, out: Path) -> list[str]:
    options = dict(MODEL_SIZES[args.model_size])
    for item in args.job_arg:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ValueError(f"--job-arg {item!r}: expected KEY=VALUE")
        options[k] = v
    options.update(split.job_args)
    steps = steps_of(args, split)
    flags = ["train", "--model", "charlm", "--steps", str(steps), "--workers", str(split.n),
             "--mode", mode, "--inner-steps", str(args.inner_steps), "--codec", args.codec,
             "--segment-steps", str(args.segment_steps), "--threads", "1", "--eval-every", str(args.eval_every),
             "--checkpoint-every", str(steps), "--segment-timeout", str(args.timeout), "--key", str(key),
             "--out", str(out), "--json", "--no-progress", "--timeout", "60", *split.flags]
    for k, v in sorted(options.items()):
        flags += ["--job-arg", f"{k}={v}"]
    return flags


def run_one(args: argparse.Namespace, work: Path, mode: str, split: Split, label: str, rate: str | None) -> Run:
    run = Run(mode, split.n, split.g, label, job_args=split.job_args)
    root = work / f"{mode}-n{split.n}-g{split.g}"
    print(f"  {mode} {run.name}: starting {split.n} node(s) ...", file=sys.stderr, flush=True)
    try:
        with EmulatedCluster(root / "mesh", n=split.n, cap=args.cap, rate=rate, preset=args.preset) as cluster:
            cluster.wait_converged(timeout=180.0, observers=[0])
            flags = train_flags(args, mode, split, cluster.submitter, root / "out")
            print(f"  {mode} {run.name}: {' '.join(flags)}", file=sys.stderr, flush=True)
            began = time.monotonic()
            with CgroupWatch(cluster) as watch:
                try:
                    done = cluster.cli(0, *flags, timeout=args.timeout)
                except subprocess.TimeoutExpired:
                    run.error = f"timed out after {args.timeout:.0f} s"
                    return run
            run.wall_s = time.monotonic() - began
            run.cpu = cluster.cpu(run.wall_s)
            run.cgroups = watch.result()
    except (RuntimeError, TimeoutError, OSError) as exc:
        run.error = f"{type(exc).__name__}: {str(exc)[-1500:]}"
        return run
    (root / "train.log").write_text(done.stdout + done.stderr)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        run.error = f"exit {done.returncode}: {done.stderr.strip()[-1500:]}"
        return run
    summary: dict[str, Any] = json.loads(lines[-1])
    run.steps, run.val_loss = int(summary["steps"]), summary.get("val_loss")
    run.train_s = float(summary.get("train_s") or 0.0)
    run.val = [r for r in read_metrics(root / "out" / "metrics.jsonl") if "val_loss" in r]
    run.crossing = time_to_target(run.val, args.target)
    return run


# ------------------------------------------------------------------------------ reporting


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def print_table(runs: Sequence[Run], table: dict[str, dict[int, dict[str, float]]], target: float) -> None:
    print(f"{'mode':<7}{'run':<10}{'G':>3}{'steps':>6}{'T target s':>11}{'first s':>9}{'at step':>8}"
          f"{'speed-up':>9}{'saved':>7}{'vs best':>8}{'saved':>7}{'val end':>8}{'train s':>8}{'wall s':>8}"
          f"  node CPU of cap")
    for r in runs:
        c, row = r.crossing, table.get(r.mode, {}).get(r.n, {}) if r.label == "same" else {}
        share = r.cpu.get("of_cap")
        cpu = f"{min(share):.0%}-{max(share):.0%}" if share else "-"
        print(f"{r.mode:<7}{r.name:<10}{r.g:>3}{r.steps:>6}{_f(c.interpolated if c else None, '.1f'):>11}"
              f"{_f(c.first if c else None, '.1f'):>9}{(c.step if c else '-'):>8}"
              f"{_f(row.get('speedup'), '.2f'):>9}{_f(row.get('saved'), '.0%'):>7}"
              f"{_f(row.get('speedup_best'), '.2f'):>8}{_f(row.get('saved_best'), '.0%'):>7}"
              f"{_f(r.val_loss, '.3f'):>8}{r.train_s:>8.0f}{r.wall_s:>8.0f}  {cpu}")
        if r.error:
            print(f"    ERROR {r.error}")
        strays = r.cgroups.get("strays")
        if strays:
            print(f"    processes outside their node's cgroup: {strays[:3]}")
    print(f"T target: wall seconds (metrics.jsonl clock) to val loss {target:g}, interpolated between the "
          f"evaluations around it; first: the first evaluation at or below it; speed-up, saved: vs N=1 at the "
          f"same G; vs best: vs the fastest N=1 run at any G")


def checks(table: dict[str, dict[int, dict[str, float]]]) -> list[dict[str, Any]]:
    """The bar, for each mode that ran ``GOAL_WORKERS`` workers and reached the target."""
    out = []
    for mode, rows in table.items():
        row = rows.get(GOAL_WORKERS, {})
        for key, what in (("saved", "N=1 at the same batch"), ("saved_best", "the best N=1 run")):
            if key in row:
                out.append({"mode": mode, "workers": GOAL_WORKERS, "what": f"time saved vs {what}",
                            "value": round(row[key], 4), "goal": f">= {GOAL_SAVED:.0%}",
                            "pass": row[key] >= GOAL_SAVED})
    return out


def plot(runs: Sequence[Run], target: float, path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    modes = list(dict.fromkeys(r.mode for r in runs))
    fig = Figure(figsize=(6.5 * len(modes), 4.8))
    FigureCanvasAgg(fig)
    for k, mode in enumerate(modes):
        ax = fig.add_subplot(1, len(modes), k + 1)
        for i, r in enumerate(x for x in runs if x.mode == mode and x.val):
            style = "-" if r.label == "same" else "--"
            ax.plot([v["wall_s"] for v in r.val], [v["val_loss"] for v in r.val], style, marker="o", ms=3,
                    color=f"C{i}", label=f"{r.name}" + (f" (G={r.g})" if r.label == "same" else ""))
            if r.crossing is not None:
                ax.plot([r.crossing.interpolated], [target], "x", color=f"C{i}", ms=9)
        ax.axhline(target, color="gray", lw=0.8, ls=":", label=f"target {target:g}")
        ax.set_xlabel("wall seconds")
        ax.set_ylabel("validation loss")
        ax.set_title(f"{mode}")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=110)


def run(args: argparse.Namespace) -> int:
    try:
        ns = parse_counts(args.workers, "--workers")
        singles = parse_counts(args.single_batches, "--single-batches")
        modes, rate = parse_modes(args.modes), link_rate(args.shape)
        if args.steps < 1 or args.global_batch < 1:
            raise ValueError("--steps and --global-batch >= 1")
        if args.cap < 0:
            raise ValueError("--cap: cores per node, 0 for no caps")
    except ValueError as exc:
        print(f"bench elastic: {exc}", file=sys.stderr)
        return 2
    if skipped(args, "speedup", rate):
        return 0
    how = args.split if args.split != "auto" else ("global-batch" if has_global_batch() else "batch-size")
    options = dict(MODEL_SIZES[args.model_size])
    for item in args.job_arg:
        key, _, value = item.partition("=")
        options[key] = value
    plan = [(args.global_batch, n) for n in ns] + [(g, 1) for g in singles if ns and (g, 1) != (args.global_batch, 1)]
    try:
        batch_splits = splits(plan, how=how, batch=int(options.get("batch_size", BATCH)),
                              eval_batches=int(options.get("eval_batches", EVAL_BATCHES)))
    except ValueError as exc:
        print(f"bench elastic: {exc}", file=sys.stderr)
        return 2
    load_start = os.getloadavg()
    runs: list[Run] = []
    with workspace(args) as work:
        for mode in modes:
            for split in batch_splits:
                label = "same" if split.g == args.global_batch else "single"
                runs.append(r := run_one(args, work, mode, split, label, rate))
                if args.json:
                    print(json.dumps({"bench": "elastic", "part": "speedup", "run": r.as_json()}), flush=True)
                c = r.crossing
                print(f"  {mode} {r.name}: target at {_f(c.interpolated if c else None, '.1f')} s, val_loss "
                      f"{r.val_loss} {r.error}", file=sys.stderr, flush=True)
    load_end = os.getloadavg()
    table = speedups(runs)
    singles_steps = ", ".join(f"G={s.g}: {steps_of(args, s)}" for s in batch_splits if s.g != args.global_batch)
    link = f"{rate} per link both ways (tc tbf; no delay emulated)" if rate else "loopback, no shaping"
    caps = f"{args.cap:g} core per node (one cgroup each: node, task and training processes)" if args.cap else "no CPU caps"
    title = (f"bench elastic speedup: charlm {args.model_size}, G={args.global_batch} micro-batches a step "
             f"({how}), {args.steps} steps (N=1 at another G: {singles_steps}), {caps}, {link}")
    print(title)
    print(f"modes {','.join(modes)} (sync segments of {args.segment_steps}, DiLoCo H={args.inner_steps}, codec "
          f"{args.codec}), eval every {args.eval_every} steps; load average {load_start[0]:.2f} at the start, "
          f"{load_end[0]:.2f} at the end, {os.cpu_count()} CPUs")
    print_table(runs, table, args.target)
    results = checks(table)
    for check in results:
        print(f"{'PASS' if check['pass'] else 'FAIL'} {check['mode']}: {check['workers']} workers, "
              f"{check['what']}: {check['value']:.1%} (goal {check['goal']})")
    if args.plot and any(r.val for r in runs):  # --plot '': none
        plot(runs, args.target, Path(args.plot), title)
        print(f"plot: {args.plot}")
    failures = [f"{r.mode} {r.name}: {r.error}" for r in runs if r.error]
    if args.json:
        print(json.dumps({"bench": "elastic", "part": "speedup", "target": args.target, "split": how,
                          "global_batch": args.global_batch, "steps": args.steps, "cap": args.cap,
                          "link": rate or "loopback", "workers": ns, "modes": modes,
                          "speedup": {m: {str(n): v for n, v in rows.items()} for m, rows in table.items()},
                          "checks": results, "runs": [r.as_json() for r in runs], "failures": failures,
                          "load_avg": {"start": list(load_start), "end": list(load_end)}}, sort_keys=True))
    return 1 if failures else 0
