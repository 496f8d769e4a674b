"""What ``python -m node train`` shows and keeps at the submitter, computed from a job's history.

Pure functions of the job's committed ``SegmentRecord`` list (and its ``JobSpec``, ``Export``,
``JobProgress``): no torch, no disk (``node.training.store.write_out`` writes what ``render``
returns), matplotlib imported only when a plot is drawn (Agg, no pyplot, no global state).

Rows of ``metrics.jsonl`` (``metrics_rows``), in step order, each a JSON object:

``{"step", "loss", "segment", "workers", "wall_s"}``
    one per optimizer step. ``step`` counts steps done (a segment ``start..end`` has steps
    ``start+1 .. end``); ``loss`` is the mean over the segment's finished workers (``null`` if
    not finite); ``workers`` is how many finished the segment; ``wall_s`` is seconds since the
    job's first segment began (plus ``started``), the segment's ``wall_s`` spread linearly over
    its steps, so it never decreases. The last step row of each segment also carries the
    segment's figures: ``tokens``, ``tokens_s`` (tokens / segment wall seconds), ``bytes_sent``
    (summed over the workers), ``compute_s``, ``comm_s`` (worker means) and ``checkpoint`` (bool).
``{"step", "val_loss", "segment", "wall_s"}``
    one per segment with a validation loss, right after that segment's last step row (same
    ``step`` and ``wall_s``). A row has exactly one of ``loss`` / ``val_loss``.

The ``summary`` dict (the final ``--json`` line, also ``summary.json``): ``job`` (hex),
``mode``, ``steps`` (committed), ``steps_total`` (asked), ``segments``, ``loss`` (final train
loss: mean of the last segment's last ``FINAL_LOSS_STEPS`` steps), ``val_loss`` and
``val_step`` (the newest validation), ``workers_seen`` (hex node ids ever in a group, first seen
first; a ``JobProgress`` lists at most ``SUMMARY_WORKERS``), ``workers`` (how many were ever
in a group: ``len(workers_seen)``, or the progress's ``seen`` if more), ``group`` (hex ids that finished the last segment),
``wall_s``, ``train_s`` (sum of segment wall seconds), ``tokens``, ``tokens_s`` (tokens /
``train_s``), ``bytes_sent``, ``compute_s``, ``comm_s``, ``utilization`` (``compute_s /
train_s``), ``checkpoint`` (hex state blob or null) and ``checkpoint_step``, ``model`` (hex blob
of the exported model or null), ``out`` (the out dir or null), and the export's ``params``,
``nonzeros``, ``file_bytes``, ``report`` (its msgpack map decoded, bytes as hex) and ``sample``
(all null without an export), ``events`` (every group change of the records, ``event_json``,
in step order) and ``newcomers`` (hex id -> seconds from when the coordinator first saw it able
to its first segment with a share of the batch: join -> first contribution). Floats that are
not finite are null.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from protocol.errors import RemoteProtocolError
from protocol.messages.training import (
    Export,
    GroupChange,
    GroupEvent,
    JobProgress,
    JobSpec,
    SegmentRecord,
)
from protocol.schema import unpack_body

#: Steps of the last segment whose mean is the summary's final train loss.
FINAL_LOSS_STEPS = 10
#: The files of an out dir, in the order ``render`` makes them.
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
SAMPLE_FILE = "sample.txt"
SUMMARY_FILE = "summary.json"


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON: bytes as hex, enums by lower-case name, structs and mappings as
    objects, sequences as lists, non-finite floats as None."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, enum.Enum):
        return value.name.lower()
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return _finite(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(jsonable(k)): jsonable(v) for k, v in value.items()}
    if isinstance(value, Iterable):
        return [jsonable(v) for v in value]
    return str(value)


def dumps(value: Any) -> str:
    """One line of strict JSON (no NaN) for ``value`` (``jsonable`` first)."""
    return json.dumps(jsonable(value), allow_nan=False, ensure_ascii=False)


def ordered(records: Sequence[SegmentRecord]) -> list[SegmentRecord]:
    """The records in step order (by ``start``, then segment number)."""
    return sorted(records, key=lambda r: (r.start, r.segment))


# ------------------------------------------------------------------------------- metrics rows


def metrics_rows(records: Sequence[SegmentRecord], *, started: float | None = None) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl`` (module docstring). ``started``: seconds on the clock when
    the first record began (e.g. a resumed job's earlier wall time; default 0)."""
    rows: list[dict[str, Any]] = []
    clock = started or 0.0
    for r in ordered(records):
        n = len(r.losses)
        for i, loss in enumerate(r.losses):
            rows.append({"step": r.start + i + 1, "loss": _finite(loss), "segment": r.segment,
                         "workers": len(r.finished), "wall_s": clock + r.wall_s * (i + 1) / n})
        clock += r.wall_s
        if rows and n:
            rows[-1].update(tokens=r.tokens, tokens_s=r.tokens / r.wall_s if r.wall_s > 0 else 0.0,
                            bytes_sent=r.bytes_sent, compute_s=r.compute_s, comm_s=r.comm_s,
                            checkpoint=r.checkpoint)
        if r.val_loss is not None:
            rows.append({"step": r.end, "val_loss": _finite(r.val_loss), "segment": r.segment,
                         "wall_s": clock})
    return rows


def metrics_jsonl(rows: Sequence[Mapping[str, Any]]) -> str:
    """``rows`` as JSON lines (one object a line, a final newline)."""
    return "".join(dumps(row) + "\n" for row in rows)


# ------------------------------------------------------------------------------------ summary


def final_loss(records: Sequence[SegmentRecord], *, last: int = FINAL_LOSS_STEPS) -> float | None:
    """Mean of the finite losses among the last ``last`` steps of the last segment (None: none)."""
    recs = ordered(records)
    if not recs:
        return None
    tail = [x for x in recs[-1].losses[-last:] if math.isfinite(x)]
    return sum(tail) / len(tail) if tail else None


def workers_seen(records: Sequence[SegmentRecord], extra: Iterable[bytes] = ()) -> list[bytes]:
    """Every node id in any record's group, then any of ``extra`` not seen, first seen first."""
    seen: dict[bytes, None] = {}
    for r in ordered(records):
        seen.update(dict.fromkeys(r.group))
    seen.update(dict.fromkeys(extra))
    return list(seen)


def decode_report(raw: bytes) -> Any:
    """The export's before/after report (a packed map) as JSON values; None if empty or bad."""
    if not raw:
        return None
    try:
        return jsonable(unpack_body(raw, what="export report"))
    except RemoteProtocolError:
        return None


def _last_checkpoint(records: Sequence[SegmentRecord]) -> tuple[bytes | None, int]:
    marked = [r for r in ordered(records) if r.checkpoint]
    return (marked[-1].state, marked[-1].end) if marked else (None, 0)


def summary(*, job: bytes, spec: JobSpec, records: Sequence[SegmentRecord],
            progress: JobProgress | None = None, export: Export | None = None,
            out: str | None = None, wall_s: float | None = None) -> dict[str, Any]:
    """The summary dict (module docstring). ``progress``: the holder's last ``JobProgress`` (its
    checkpoint and ``workers_seen`` win over what the records say); ``export``: default the
    last record's or the progress's; ``wall_s``: the submitter's measured seconds (default the
    sum of the segments')."""
    recs = ordered(records)
    last = recs[-1] if recs else None
    export = export or next((r.export for r in reversed(recs) if r.export), None) or (
        progress.export if progress else None)
    checkpoint, checkpoint_step = _last_checkpoint(recs)
    if progress is not None and progress.checkpoint is not None:
        checkpoint, checkpoint_step = progress.checkpoint, progress.checkpoint_step
    seen = workers_seen(recs, progress.workers_seen if progress else ())
    seen_count = max(len(seen), progress.seen if progress else 0)
    val = next(((r.val_loss, r.end) for r in reversed(recs) if r.val_loss is not None), (None, None))
    train_s = sum(r.wall_s for r in recs)
    tokens = sum(r.tokens for r in recs)
    events = [e for r in recs for e in r.events]
    compute_s = sum(r.compute_s for r in recs)
    return {
        "job": job.hex(), "mode": spec.mode,
        "steps": last.end if last else spec.resume_step, "steps_total": spec.steps,
        "segments": len(recs),
        "loss": final_loss(recs), "val_loss": _finite(val[0]), "val_step": val[1],
        "workers_seen": [n.hex() for n in seen], "workers": seen_count,
        "group": [n.hex() for n in last.finished] if last else [],
        "wall_s": train_s if wall_s is None else wall_s, "train_s": train_s,
        "tokens": tokens, "tokens_s": tokens / train_s if train_s > 0 else 0.0,
        "bytes_sent": sum(r.bytes_sent for r in recs),
        "compute_s": compute_s, "comm_s": sum(r.comm_s for r in recs),
        "utilization": compute_s / train_s if train_s > 0 else None,
        "checkpoint": checkpoint.hex() if checkpoint else None, "checkpoint_step": checkpoint_step,
        "model": export.model.hex() if export else None, "out": out,
        "params": export.params if export else None,
        "nonzeros": export.nonzeros if export else None,
        "file_bytes": export.file_bytes if export else None,
        "report": decode_report(export.report) if export else None,
        "sample": export.sample if export and export.sample else None,
        "events": [event_json(e) for e in events],
        "newcomers": {e.node.hex(): e.seconds for e in events if e.change is GroupChange.ACTIVE},
    }


def event_json(e: GroupEvent) -> dict[str, Any]:
    """``{"change": "joined"|"active"|"gone"|"failed", "node": hex, "step", "seconds", "reason"}``."""
    return {"change": e.change.name.lower(), "node": e.node.hex(), "step": e.step,
            "seconds": _finite(e.seconds), "reason": e.reason}


def event_line(e: GroupEvent) -> str:
    """One group change for people: ``step 40: + 1a2b3c4d joined (listening, fetching the state)``."""
    who = e.node.hex()[:8]
    what = {
        GroupChange.JOINED: f"+ {who} joined (listening while it fetches the state; seen {e.seconds:.1f} s ago)",
        GroupChange.ACTIVE: f"+ {who} trains: first contribution {e.seconds:.1f} s after it was seen",
        GroupChange.GONE: f"- {who} gone: {e.reason or 'lost'}",
        GroupChange.FAILED: f"- {who} dropped: {e.reason or 'its seat failed'}",
    }[e.change]
    return f"step {e.step}: {what}"


def config_json(spec: JobSpec, job_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``config.json``: every ``JobSpec`` field (bytes as hex, options as a list of
    ``{"key", "value"}``) plus ``job_config`` (the job function's own config, or null)."""
    fields = jsonable(spec)
    assert isinstance(fields, dict)
    return {**fields, "job_config": jsonable(job_config) if job_config is not None else None}


# ------------------------------------------------------------------------------ human lines


def duration(seconds: float) -> str:
    """``42s``, ``5m12s``, ``2h05m``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _size(n: int) -> str:
    return f"{n / 1e3:.1f} kB" if n < 1e6 else _mb(n)


def _num(x: float | None, digits: int = 3) -> str:
    return "?" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def eta(p: JobProgress, *, started: float, now: float, start_step: int = 0) -> float | None:
    """Seconds left at the committed step rate since ``started`` (None: no step yet)."""
    done = p.step - start_step
    if p.step >= p.steps:
        return 0.0
    if done <= 0 or now <= started:
        return None
    return (p.steps - p.step) * (now - started) / done


def progress_line(p: JobProgress, *, started: float, now: float, start_step: int = 0) -> str:
    """One line of live progress: ``started``/``now`` are the submitter's clock (seconds),
    ``start_step`` the step the job began at (a resume's), for the step rate of the ETA."""
    step = f"step {p.step}/{p.steps}" + (f" (live {p.live_step})" if p.live_step > p.step else "")
    parts = [step, f"loss {_num(p.loss)}"]
    if p.val_loss is not None:
        parts.append(f"val {_num(p.val_loss)}")
    workers = f"{p.group_size or len(p.workers)} workers"
    if p.listeners:
        workers += f" ({len(p.listeners)} joining)"
    parts += [f"{p.tokens_s:,.0f} tok/s", workers, f"wire {_mb(p.bytes_sent)}"]
    left = eta(p, started=started, now=now, start_step=start_step)
    parts.append(f"{duration(now - started)} elapsed")
    parts.append("ETA ?" if left is None else f"ETA {duration(left)}")
    if p.waiting:
        parts.append(f"[{p.waiting}]")
    return "  ".join(parts)


def _report_lines(report: Any) -> list[str]:
    if isinstance(report, Mapping):
        return [f"  {k}: " + (", ".join(f"{kk} {_fmt(vv)}" for kk, vv in v.items())
                             if isinstance(v, Mapping) else _fmt(v)) for k, v in report.items()]
    return [] if report is None else [f"  {_fmt(report)}"]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def comparison(s: Mapping[str, Any], reference: Mapping[str, float] | None = None) -> str:
    """``val loss 2.41 (3 nodes, 200 steps) vs 2.35 one process (+2.6%); vs 1.88 nanoGPT ...``."""
    val = s.get("val_loss")
    loss, what = (val, "val loss") if val is not None else (s.get("loss"), "train loss")
    line = f"{what} {_num(loss, 2)} ({s.get('workers', 0)} nodes, {s.get('steps', 0)} steps)"
    refs = []
    for name, ref in (reference or {}).items():
        rel = f" ({(loss - ref) / ref:+.1%})" if loss is not None and ref else ""
        refs.append(f"{_num(ref, 2)} {name}{rel}")
    return line + (" vs " + "; vs ".join(refs) if refs else "")


def format_summary(s: Mapping[str, Any], reference: Mapping[str, float] | None = None) -> str:
    """The summary for a person: a few lines, the sample, then the ``comparison`` line."""
    lines = [
        f"job {s.get('job')}  {s.get('mode')}  {s.get('steps')}/{s.get('steps_total')} steps  "
        f"{s.get('segments')} segments  {s.get('workers')} workers seen",
        f"train loss {_num(s.get('loss'))} (last {FINAL_LOSS_STEPS} steps)  "
        f"val loss {_num(s.get('val_loss'))}" + (f" at step {s['val_step']}" if s.get("val_step") else ""),
        f"wall {duration(float(s.get('wall_s') or 0.0))}  {float(s.get('tokens_s') or 0.0):,.0f} tokens/s  "
        f"{_mb(int(s.get('bytes_sent') or 0))} sent"
        + (f"  compute {s['utilization']:.0%} of wall" if s.get("utilization") is not None else ""),
    ]
    where = []
    if s.get("checkpoint"):
        where.append(f"checkpoint {s['checkpoint']} at step {s.get('checkpoint_step')}")
    if s.get("model"):
        where.append(f"model {s['model']}")
    if s.get("out"):
        where.append(f"out {s['out']}")
    if where:
        lines.append("  ".join(where))
    if s.get("params") is not None:
        lines.append(f"export: {s['params']:,} params, {s.get('nonzeros') or 0:,} nonzeros, "
                     f"{_size(int(s.get('file_bytes') or 0))} file")
        lines += _report_lines(s.get("report"))
    if s.get("sample"):
        lines.append("sample:")
        lines += [f"  {line}" for line in str(s["sample"]).splitlines()]
    lines.append(comparison(s, reference))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- plot


def loss_png(rows: Sequence[Mapping[str, Any]], *, title: str = "",
             reference: Mapping[str, float] | None = None) -> bytes:
    """A PNG of two panels: loss against steps and against wall seconds; the train loss as a
    line, validation as points joined by a line, each ``reference`` a dashed horizontal line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [r for r in rows if r.get("loss") is not None]
    val = [r for r in rows if r.get("val_loss") is not None]
    fig = Figure(figsize=(11, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, x, label in ((axes[0], "step", "step"), (axes[1], "wall_s", "wall seconds")):
        ax.plot([r[x] for r in train], [r["loss"] for r in train], lw=1, color="C0", label="train")
        if val:
            ax.plot([r[x] for r in val], [r["val_loss"] for r in val], "o-", ms=4, color="C1",
                    label="validation")
        for i, (name, value) in enumerate((reference or {}).items()):
            ax.axhline(value, ls="--", lw=1, color=f"C{i + 2}", label=f"{name} ({value:.2f})")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss")
    axes[0].legend(loc="upper right", fontsize="small")
    if title:
        fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


# ------------------------------------------------------------------------------- the out dir


def render(*, spec: JobSpec, records: Sequence[SegmentRecord], model_bytes: bytes | None,
           export: Export | None, summary: Mapping[str, Any], job_config: Mapping[str, Any] | None,
           title: str = "", reference: Mapping[str, float] | None = None,
           started: float | None = None) -> dict[str, bytes]:
    """File name -> bytes of an out dir: ``model.safetensors`` (``model_bytes`` as given; absent
    if None), ``config.json``, ``metrics.jsonl``, ``loss.png``, ``sample.txt`` (if the export
    has a sample) and ``summary.json``."""
    rows = metrics_rows(records, started=started)
    files: dict[str, bytes] = {}
    if model_bytes is not None:
        files[MODEL_FILE] = model_bytes
    files[CONFIG_FILE] = (json.dumps(config_json(spec, job_config), indent=2, allow_nan=False) + "\n").encode()
    files[METRICS_FILE] = metrics_jsonl(rows).encode()
    files[PLOT_FILE] = loss_png(rows, title=title, reference=reference)
    if export is not None and export.sample:
        files[SAMPLE_FILE] = (export.sample.rstrip("\n") + "\n").encode()
    files[SUMMARY_FILE] = (json.dumps(jsonable(summary), indent=2, allow_nan=False) + "\n").encode()
    return files
