"""The training domain's on-disk side: a finished job's ``--out DIR`` at the submitter.

``write_out`` writes what ``outputs.render`` computes, each file atomically
(``node.files.atomic_write``: a temporary sibling, fsync, rename), so a reader never sees half a
file and a second run into the same dir replaces the files one by one. ``plot_losses`` writes
just the plot. The contents are ``node.training.outputs``'s (a core: no disk there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from node.files import atomic_write
from node.training import outputs
from protocol.errors import ConfigError
from protocol.messages.training import Export, JobSpec, SegmentRecord


def _mkdir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{out}: cannot create the out dir: {exc.strerror or exc}") from None


def write_out(out: Path, *, spec: JobSpec, records: Sequence[SegmentRecord], model_bytes: bytes | None,
              export: Export | None, summary: Mapping[str, Any], job_config: Mapping[str, Any] | None,
              title: str = "", reference: Mapping[str, float] | None = None,
              started: float | None = None) -> list[Path]:
    """Create ``out`` and write the job's files into it (``outputs.render``); the paths written,
    in order. ``ConfigError`` naming the file if one cannot be written."""
    files = outputs.render(spec=spec, records=records, model_bytes=model_bytes, export=export,
                           summary=summary, job_config=job_config, title=title,
                           reference=reference, started=started)
    _mkdir(out)
    written = []
    for name, data in files.items():
        atomic_write(out / name, data, what=name)
        written.append(out / name)
    return written


def plot_losses(rows: Sequence[Mapping[str, Any]], path: Path, *, title: str = "",
                reference: Mapping[str, float] | None = None) -> Path:
    """Write ``outputs.loss_png(rows, ...)`` to ``path`` (its dir created); returns ``path``."""
    _mkdir(path.parent)
    atomic_write(path, outputs.loss_png(rows, title=title, reference=reference), what="loss plot")
    return path
