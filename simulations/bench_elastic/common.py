"""What every ``bench elastic`` part does the same way: read ``--modes`` and ``--shape``, skip
where the emulated cluster cannot be built, and keep a work dir that SIGTERM cleans up too."""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from simulations.bench_elastic.cluster import unavailable
from simulations.netshape import rate_bytes_per_s


def parse_modes(text: str) -> list[str]:
    """``--modes``: some of sync,diloco (``ValueError`` otherwise)."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if not modes or set(modes) - {"sync", "diloco"}:
        raise ValueError("--modes: some of sync,diloco")
    return modes


def link_rate(shape: str) -> str | None:
    """``--shape``: None for loopback, else the tbf rate (checked: ``ValueError``)."""
    if shape == "loopback":
        return None
    rate_bytes_per_s(shape)
    return shape


def skipped(args: argparse.Namespace, part: str, rate: str | None) -> bool:
    """Whether the part cannot run here (no root, cgroups, netns, tc); says why, and with
    ``--json`` a JSON line with ``skipped``."""
    why = unavailable(cap=args.cap, rate=rate)
    if why:
        print(f"bench elastic --part {part}: skipped: {why} (--cap 0 --shape loopback runs without root)")
        if args.json:
            print(json.dumps({"bench": "elastic", "part": part, "skipped": why}))
    return bool(why)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the clusters' close(): cgroups, namespaces


@contextlib.contextmanager
def workspace(args: argparse.Namespace) -> Iterator[Path]:
    """``--dir`` or a temporary dir (removed at the end); SIGTERM unwinds like Ctrl-C meanwhile,
    so every cluster's ``close()`` runs."""
    work = args.dir or Path(tempfile.mkdtemp(prefix="starmesh-bench-elastic-"))
    work.mkdir(parents=True, exist_ok=True)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield work
    finally:
        signal.signal(signal.SIGTERM, previous)
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
