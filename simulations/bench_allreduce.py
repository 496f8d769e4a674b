"""``python -m simulations bench allreduce``: real node processes average a tensor; gloo as reference.

For each link setting (``--shape``: ``loopback``, or rates such as ``100mbit`` / ``1gbit``
for which every node runs in its own network namespace, its link shaped both ways with
``tc tbf``) and each data set (``--data``: ``normal`` = N(0,1) float32 per node, ``grad`` =
each node's gradient of one small transformer LM on its own batch of tokens, made here
with torch), ``--nodes`` worker processes (``simulations.allreduce_worker``: a real
``Node``, encrypted links) run ``--rounds`` rounds per codec after a warm-up, then the
same number of ``torch.distributed`` gloo ranks all-reduce the same inputs on the same
links (SUM, then divide).

Per codec it prints: wall time per round (median over rounds of the slowest node), bytes
each node put on the wire (mean over nodes, TCP payload incl. framing and encryption), that
as a fraction of the fp32 tensor, for shaped links the ratio of the time to the
link-limited optimum ``2(N-1)/N x encoded bytes / bandwidth`` (= bytes a node sends /
bandwidth) and the efficiency optimum/time, the relative L2 error of the result against the
exact fp64 mean, CPU seconds per round per node, peak RSS per node, the worst event-loop lag
of any node during the codec's rounds (``loop_lag_max_seconds``: how late a 0.1 s timer ran),
and gloo's time; after the table, each node's worst lag over its whole run.
With ``--json`` the last line is a JSON list with one object per (codec, link, data set).
``--bulk-congestion NAME`` runs the nodes with that TCP congestion control on their tensor
links (``python -m node --bulk-congestion``); gloo always runs on the system's, and the
header line says which each side used.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from node import congestion
from simulations import allreduce_procs as procs
from simulations.allreduce_worker import codec_file, load_input
from simulations.netshape import ShapedNet, rate_bytes_per_s, unavailable

Floats = NDArray[np.float32]
DEFAULT_CODECS = "none,fp16,int8,int8+zstd,topk"
_SUFFIX = {"k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def parse_size(text: str) -> int:
    """``25M`` -> 25_000_000; ``4Mi`` -> 4_194_304; ``1000`` -> 1000."""
    t = text.strip().lower()
    for suffix in sorted(_SUFFIX, key=len, reverse=True):
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * _SUFFIX[suffix])
    return int(t)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=4, help="node processes (and gloo ranks)")
    parser.add_argument("--size", type=parse_size, default=parse_size("25M"),
                        help="elements of the tensor, e.g. 25M (decimal) or 16Mi")
    parser.add_argument("--codec", "--codecs", dest="codecs", default=DEFAULT_CODECS,
                        help="comma-separated codec specs (none|fp16|int8|int8+zstd|topk|...)")
    parser.add_argument("--data", default="normal,grad", help="comma-separated: normal, grad")
    parser.add_argument("--shape", default="loopback",
                        help="comma-separated link settings: loopback and/or rates (100mbit, 1gbit); "
                             "rates need root and ip netns, and are skipped with a message otherwise")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per codec")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up rounds (small tensor)")
    parser.add_argument("--no-gloo", action="store_true", help="skip the torch.distributed reference")
    parser.add_argument("--no-early-averages", action="store_true",
                        help="rounds wait for the commit before any average goes out (AllReduceConfig.early_averages)")
    parser.add_argument("--bulk-congestion", metavar="NAME",
                        help="TCP congestion control of the nodes' tensor links (node --bulk-congestion), "
                             "e.g. cubic or bbr; default: the system's (gloo always uses the system's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, outputs)")
    parser.add_argument("--json", action="store_true", help="print a final JSON line")


@dataclass
class Row:
    codec: str
    nodes: int
    elements: int
    data: str
    link: str
    seconds: float
    wire_bytes_per_node: float
    bytes_vs_fp32: float
    rel_error: float
    cpu_seconds: float
    peak_rss_bytes: int
    identical: bool
    dropped: int
    bulk_congestion: str
    """What the nodes' tensor sockets used (read back from them at the end)."""
    loop_lag_max_seconds: float = 0.0
    """The worst event-loop lag of any node during this codec's rounds."""
    node_loop_lag_max_seconds: tuple[float, ...] = ()
    """Each node's worst event-loop lag over its whole run (every codec, warm-up included)."""
    gloo_seconds: float | None = None
    link_optimum_seconds: float | None = None
    link_optimum_ratio: float | None = None
    link_efficiency: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


# --------------------------------------------------------------------------- inputs


def lm_for_size(size: int) -> Any:
    """An LMConfig (``bench_codecs``) with at least ~``size`` parameters."""
    from simulations.bench_codecs import LMConfig

    d = 512 if size >= 8_000_000 else 256 if size >= 2_000_000 else 128
    vocab = 8192 if d == 512 else 4096
    per_layer = 12 * d * d + 13 * d
    layers = max(1, min(48, -(-(size - 2 * vocab * d) // per_layer)))
    return LMConfig(vocab=vocab, d_model=d, layers=layers, heads=8, seq=64, batch=8)


def make_gradients(n: int, size: int, seed: int, out_dir: Path) -> list[str]:
    """``n`` gradient files (``npy:PATH`` specs): one model, a different token batch each,
    the flattened gradient cut (or tiled) to ``size`` elements."""
    import torch

    from simulations.bench_codecs import MarkovTokens, build_lm, flat_grad, lm_loss

    torch.set_num_threads(2)
    cfg = lm_for_size(size)
    model = build_lm(cfg, seed)
    data = MarkovTokens(cfg.vocab, seed + 1)
    specs = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed + 100 + i)
        model.zero_grad(set_to_none=True)
        lm_loss(model, *data.batch(cfg, g)).backward()
        flat = flat_grad(model)
        flat = np.resize(flat, size).astype(np.float32) if flat.size < size else flat[:size].copy()
        path = out_dir / f"grad{i}.npy"
        np.save(path, flat)
        specs.append(f"npy:{path}")
    return specs


def exact_mean(inputs: list[str], size: int) -> NDArray[np.float64]:
    acc = np.zeros(size, np.float64)
    for spec in inputs:
        acc += load_input(spec, size)
    acc /= len(inputs)
    return acc


def rel_error(out: Floats, exact: NDArray[np.float64]) -> float:
    return float(np.linalg.norm(out.astype(np.float64) - exact)) / max(float(np.linalg.norm(exact)), 1e-300)


# --------------------------------------------------------------------------- one setting


def _round_timeout(size: int, rate: float | None) -> float:
    bw = rate if rate else 200e6
    return max(60.0, 10.0 * 8.0 * size / bw)


def measure(args: argparse.Namespace, work: Path, link: str, data: str, inputs: list[str],
            exact: NDArray[np.float64]) -> list[Row]:
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    rate = rate_bytes_per_s(link) if link != "loopback" else None
    timeout = _round_timeout(args.size, rate)
    total = timeout * (len(codecs) * args.rounds + args.warmup + 2)
    root = work / f"{link}-{data}"
    net = ShapedNet(args.nodes, rate=link) if rate else None
    try:
        if net is not None:
            net.create()
        t0 = time.monotonic()
        flags = (["--no-early-averages"] if args.no_early_averages else []) + (
            ["--bulk-congestion", args.bulk_congestion] if args.bulk_congestion else [])
        extra = [flags] * args.nodes
        mesh = procs.finish(procs.start_mesh(root, inputs, size=args.size, codecs=codecs,
                                             rounds=args.rounds, warmup=args.warmup,
                                             timeout=timeout, net=net, extra=extra), total)
        print(f"  {link}/{data}: mesh done in {time.monotonic() - t0:.1f}s", file=sys.stderr)
        gloo = None
        if not args.no_gloo:
            gloo = procs.finish(procs.start_gloo(root, inputs, size=args.size, rounds=args.rounds,
                                                 timeout=timeout, net=net, save_output=False), total)
    finally:
        if net is not None:
            net.close()
    gloo_s = statistics.median(max(g["rounds"][r]["seconds"] for g in gloo)
                               for r in range(args.rounds)) if gloo else None
    return [_row(args, link, data, codec, mesh, exact, rate, gloo_s) for codec in codecs]


def _row(args: argparse.Namespace, link: str, data: str, codec: str, mesh: list[dict[str, Any]],
         exact: NDArray[np.float64], rate: float | None, gloo_s: float | None) -> Row:
    per = [w["codecs"][codec]["rounds"] for w in mesh]
    seconds = statistics.median(max(p[r]["seconds"] for p in per) for r in range(args.rounds))
    wire = statistics.mean(statistics.median(r["sent_bytes"] for r in p) for p in per)
    cpu = statistics.mean(statistics.median(r["cpu_s"] for r in p) for p in per)
    outs = [np.load(w["codecs"][codec]["output"]) for w in mesh]
    row = Row(codec=codec, nodes=args.nodes, elements=args.size, data=data, link=link,
              seconds=seconds, wire_bytes_per_node=wire,
              bytes_vs_fp32=wire / (2 * (args.nodes - 1) / args.nodes * 4 * args.size),
              rel_error=rel_error(outs[0], exact), cpu_seconds=cpu,
              peak_rss_bytes=max(w["peak_rss_bytes"] for w in mesh),
              identical=all(np.array_equal(o, outs[0]) for o in outs),
              dropped=sum(len(r["dropped"]) for p in per for r in p), gloo_seconds=gloo_s,
              loop_lag_max_seconds=max(w["codecs"][codec].get("loop_lag_max_seconds", 0.0) for w in mesh),
              node_loop_lag_max_seconds=tuple(w.get("loop_lag_max_seconds", 0.0) for w in mesh),
              bulk_congestion=",".join(sorted({cc for w in mesh for cc in w.get("bulk_congestion", [])})))
    if rate:
        row.link_optimum_seconds = wire / rate
        row.link_optimum_ratio = seconds / row.link_optimum_seconds
        row.link_efficiency = row.link_optimum_seconds / seconds
    return row


# --------------------------------------------------------------------------- output


def print_table(rows: list[Row]) -> None:
    print(f"{'link':<9}{'data':<7}{'codec':<12}{'s/round':>9}{'gloo s':>8}{'x gloo':>7}"
          f"{'MB/node':>9}{'/fp32':>7}{'t/opt':>7}{'%opt':>6}{'rel err':>10}{'cpu s':>7}{'RSS MB':>8}"
          f"{'lag ms':>8}")
    for r in rows:
        gloo = f"{r.gloo_seconds:>8.3f}{r.seconds / r.gloo_seconds:>7.2f}" if r.gloo_seconds else f"{'-':>8}{'-':>7}"
        opt = (f"{r.link_optimum_ratio:>7.3f}{100 * (r.link_efficiency or 0):>6.1f}"
               if r.link_optimum_ratio else f"{'-':>7}{'-':>6}")
        print(f"{r.link:<9}{r.data:<7}{r.codec:<12}{r.seconds:>9.3f}{gloo}{r.wire_bytes_per_node / 1e6:>9.2f}"
              f"{r.bytes_vs_fp32:>7.3f}{opt}{r.rel_error:>10.2e}{r.cpu_seconds:>7.2f}"
              f"{r.peak_rss_bytes / 2**20:>8.0f}{1000 * r.loop_lag_max_seconds:>8.0f}"
              + ("" if r.identical else "  (outputs differ!)"))


def loop_lag_lines(rows: list[Row]) -> list[str]:
    """Each node's worst event-loop lag, one line per mesh run (link, data set)."""
    out, seen = [], set()
    for r in rows:
        if (r.link, r.data) in seen or not r.node_loop_lag_max_seconds:
            continue
        seen.add((r.link, r.data))
        per = ", ".join(f"node {i} {1000 * lag:.0f}" for i, lag in enumerate(r.node_loop_lag_max_seconds))
        out.append(f"worst event-loop lag in ms ({r.link}, {r.data}): {per}")
    return out


def check_targets(rows: list[Row]) -> list[str]:
    """The issue's targets, as measured (PASS/FAIL lines; never asserted)."""
    out = []
    for r in rows:
        if r.link_efficiency is not None and r.codec == "none":
            ok = r.link_efficiency >= 0.9
            out.append(f"{'PASS' if ok else 'FAIL'} >= 90% of the link optimum at {r.link} "
                       f"({r.data}, none): {100 * r.link_efficiency:.1f}%")
        if r.codec == "int8+zstd" and r.data == "grad" and r.link == rows[0].link:
            ok = r.bytes_vs_fp32 <= 0.2
            out.append(f"{'PASS' if ok else 'FAIL'} int8+zstd <= 0.2x fp32 bytes on real gradients "
                       f"({r.bytes_vs_fp32:.3f})")
        if r.codec == "none" and r.link == "loopback" and r.gloo_seconds:
            ok = r.seconds <= 3 * r.gloo_seconds
            out.append(f"{'PASS' if ok else 'FAIL'} loopback, none, encrypted within 3x of gloo "
                       f"({r.data}): {r.seconds / r.gloo_seconds:.2f}x")
    return out


def run(args: argparse.Namespace) -> int:
    if args.nodes < 2:
        print("--nodes must be >= 2", file=sys.stderr)
        return 2
    links = [s.strip().lower() for s in args.shape.split(",") if s.strip()]
    shaped = [s for s in links if s != "loopback"]
    why = unavailable() if shaped else None
    if why:
        print(f"skipping shaped links {', '.join(shaped)}: {why}")
        links = [s for s in links if s == "loopback"]
    for s in shaped:
        rate_bytes_per_s(s)  # ValueError on a bad rate, before any work
    work = Path(tempfile.mkdtemp(prefix="starmesh-bench-ar-"))
    rows: list[Row] = []
    try:
        for data in [d.strip() for d in args.data.split(",") if d.strip()]:
            if data == "normal":
                inputs = [f"normal:{args.seed * 1000 + i}" for i in range(args.nodes)]
            elif data == "grad":
                inputs = make_gradients(args.nodes, args.size, args.seed, work)
            else:
                print(f"unknown data set {data!r}: expected normal or grad", file=sys.stderr)
                return 2
            exact = exact_mean(inputs, args.size)
            for link in links:
                rows += measure(args, work, link, data, inputs, exact)
    finally:
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"all-reduce of {args.size} float32 elements, {args.nodes} node processes, median of "
          f"{args.rounds} rounds (slowest node); encryption on; t/opt = time / link optimum; TCP "
          f"congestion control of the nodes' tensor links: {args.bulk_congestion or 'system'}, "
          f"gloo's and the system's: {congestion.system_default()}")
    print_table(rows)
    for line in loop_lag_lines(rows):
        print(line)
    for line in check_targets(rows):
        print(line)
    if args.json:
        print(json.dumps([r.as_json() for r in rows]))
    return 0


__all__ = ["add_arguments", "codec_file", "parse_size", "run"]
