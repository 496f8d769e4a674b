"""What ``python -m simulations chaos`` recorded, and the verdict drawn from it.

``chaos.py`` fills one ``MemberRecord`` per honest member while the run goes (process
samples from ``/proc``, metric samples from ``status``, status answers, kills, freezes,
crashes); ``analyze`` turns the records, the node logs, the hostile member's acts and the
trainers' rounds into one JSON-able report, and ``render`` prints it as rich tables.

Deaths. Every ``member dead: X`` line an honest node logs about an honest X is one
declaration, classified in this order:

1. *during a real fault*: X was killed (or crashed) and the line falls between the kill and
   ``KILL_GRACE_S`` after X rejoined (or after its restart, if it never did). Not counted.
2. *lie*: the hostile member made a claim about X (``suspect_lie``, ``dead_lie``,
   ``self_max``) in the ``LIE_WINDOW_S`` before it. Reported apart, as *refuted* when the
   same detector logs X joined (alive again) before the run ends (with the longest delay),
   else *not refuted*.
3. *false death*: anything else, split by whether X or the detector was frozen (SIGSTOP)
   within ``FREEZE_WINDOW_S`` before it.

Leaks (a failure, exit status 1), per honest member after the quiet phase (attacks stopped,
every node running for ``settle`` seconds):

* ``links``: its link table (``connections``, every channel, handshaking included) above
  ``2 x peers + LINK_SLACK`` (a CONTROL and a BULK link per peer, plus the observers');
* ``fds``: for a process alive from the baseline to the end, more than ``FD_SLACK`` file
  descriptors above its baseline;
* ``rss``: for such a process, resident memory grown by more than ``max(RSS_SLACK_MIB,
  RSS_SLACK_FRACTION x baseline)``;
* ``queue``: ``allreduce_pending_bytes`` above ``PENDING_BYTES_LIMIT`` at any sample (twice
  the node's default budget for messages of rounds not started, 32 MiB).

Membership events a node dropped at its event-queue bound (``gossip_events_dropped_total``,
reported per member) are also missing from its log, so its deaths can be undercounted.

Lock-outs (a failure): a member that should answer (running, not frozen, ``GRACE_S`` past
a thaw or a start) and answered neither the persistent status link nor a freshly dialed one
for ``lockout_s`` in a row, or did not answer a fresh dial at the end; a restart that never
rejoined (alive with a higher incarnation in every other honest view; one slower than
``rejoin_timeout`` is reported as slow); no identical view of the honest members by the end
of the heal phase (the run waits up to ``heal_timeout`` after the quiet phase for one:
gossip diluted by fake members can take a while to spread a refutation, but must get there). Crashes (a
failure): a process that exited without being killed, and one that did not exit 0 within
``STOP_TIMEOUT_S`` of SIGTERM at the end. Wrong all-reduce results are failures too.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KILL_GRACE_S = 10.0
LIE_WINDOW_S = 20.0
FREEZE_WINDOW_S = 12.0
GRACE_S = 3.0
#: Log lines carry milliseconds; an act is recorded just after its message went out.
LOG_SLACK_S = 1.0
#: Seconds ``loop_lag_seconds`` looks back (``node.looplag.WINDOW_S``): the worst lag of a
#: sample is blamed on the hostile acts to that member in this window before it.
LAG_WINDOW_S = 10.0
LINK_SLACK = 4
FD_SLACK = 16
RSS_SLACK_MIB = 64.0
RSS_SLACK_FRACTION = 0.5
PENDING_BYTES_LIMIT = 64 << 20
STOP_TIMEOUT_S = 5.0
#: Metrics kept per sample (names as ``status --json`` gives them).
QUEUE_METRICS = ("gossip_pending_broadcasts", "gossip_pending_dials", "allreduce_pending_bytes",
                 "allreduce_pending_rounds", "allreduce_rounds_active", "gossip_events_dropped_total")
LIE_KINDS = frozenset({"suspect_lie", "dead_lie", "self_max"})

_LOG_LINE = re.compile(r"^(?:\d{4}-\d\d-\d\d )?(\d\d):(\d\d):(\d\d)[.,](\d{3}) +([A-Z]+) +(.*)$")
_DEAD = re.compile(r"member dead: ([0-9a-f]{10}) ")
_JOINED = re.compile(r"member (?:joined|refuted suspicion): ([0-9a-f]{10}) ")


@dataclass
class Kill:
    at: float
    slow: bool = False
    """Not rejoined ``rejoin_timeout`` after it listened again."""
    cause: str = "kill"
    """``kill`` (the schedule's kill -9) or ``crash`` (exited by itself; restarted)."""
    incarnation_before: int | None = None
    restarted: float | None = None
    ready: float | None = None
    rejoined: float | None = None
    failed: str = ""
    """Why the rejoin failed ('' while pending or when it succeeded)."""


@dataclass
class MemberRecord:
    name: str
    kind: str
    """``node`` (``python -m node``) or ``trainer`` (``chaos_trainer_worker``)."""
    node_id: str = ""
    log_path: Path | None = None
    kills: list[Kill] = field(default_factory=list)
    freezes: list[tuple[float, float]] = field(default_factory=list)
    starts: list[float] = field(default_factory=list)
    """Unix times the process (re)started listening (ready file seen)."""
    crashes: list[dict[str, Any]] = field(default_factory=list)
    proc: list[tuple[float, int, int, int]] = field(default_factory=list)
    """(time, pid, open fds, RSS bytes)."""
    metrics: list[tuple[float, int, dict[str, float]]] = field(default_factory=list)
    """(time, pid, {links, members, loop_lag_seconds, loop_lag_max_seconds, *QUEUE_METRICS})."""
    answers: list[tuple[float, str, bool]] = field(default_factory=list)
    """(time, ``poll`` or ``fresh``, answered) while it was expected to answer."""
    final_fresh: bool | None = None
    stop: dict[str, Any] = field(default_factory=dict)
    """How it ended: ``rc``, ``seconds`` after SIGTERM."""

    def frozen_near(self, t: float, window: float) -> bool:
        return any(start - 0.5 <= t and end >= t - window for start, end in self.freezes)


@dataclass
class RunRecord:
    args: dict[str, Any]
    members: list[MemberRecord]
    started: float
    baseline: float
    chaos_end: float
    final: float
    acts: list[dict[str, Any]]
    rounds: dict[str, list[dict[str, Any]]]
    """Trainer name -> its slot lines."""
    final_view_ok: bool
    final_view: list[str]
    """Where the final views disagree: ``"n2 sees n1 dead@1"`` (empty when they agree)."""
    heal_seconds: float | None
    """Seconds after the quiet phase until one view (None: never, within ``heal_timeout``)."""
    skipped_faults: int
    hostile_rc: int | None
    peers: int
    """Honest members minus one: the peers one member has."""


def metric_sample(metrics: dict[str, float]) -> dict[str, float]:
    """What a sample keeps of a ``status --json`` metrics dict."""
    out = {"links": sum(v for k, v in metrics.items() if k.startswith("connections{")),
           "members": sum(v for k, v in metrics.items() if k.startswith("members{")),
           "loop_lag_seconds": metrics.get("loop_lag_seconds", 0.0),
           "loop_lag_max_seconds": metrics.get("loop_lag_max_seconds", 0.0)}
    for name in QUEUE_METRICS:
        out[name] = metrics.get(name, 0.0)
    return out


# ------------------------------------------------------------------------- logs


def parse_log(path: Path | None, day_start: float, started: float) -> list[tuple[float, str, str]]:
    """(unix time, level, message) of every log line (time of day turned into unix time on
    the run's day; a line not starting with a time is appended to the previous message)."""
    if path is None:
        return []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    out: list[tuple[float, str, str]] = []
    for raw in text.splitlines():
        m = _LOG_LINE.match(raw)
        if m is None:
            if raw.startswith("Traceback"):
                out.append((out[-1][0] if out else started, "ERROR", raw))
            elif out:
                t, level, msg = out[-1]
                out[-1] = (t, level, msg + "\n" + raw)
            continue
        h, mi, s, ms, level, msg = m.groups()
        t = day_start + int(h) * 3600 + int(mi) * 60 + int(s) + int(ms) / 1000
        if t < started - 3600:  # past midnight
            t += 86400
        out.append((t, level, msg))
    return out


def _day_start(t: float) -> float:
    d = dt.datetime.fromtimestamp(t)
    return dt.datetime(d.year, d.month, d.day).timestamp()


# ------------------------------------------------------------------------- analysis


def _deaths(run: RunRecord, logs: dict[str, list[tuple[float, str, str]]]) -> dict[str, Any]:
    by_short = {m.node_id[:10]: m for m in run.members if m.node_id}
    lies: dict[str, list[float]] = {}
    for act in run.acts:
        if act.get("kind") in LIE_KINDS and act.get("ok"):
            for about in act.get("about", []):
                lies.setdefault(about[:10], []).append(float(act["t"]))
    counts: Counter[str] = Counter()
    samples: list[dict[str, Any]] = []
    delays: list[float] = []
    for detector in run.members:
        lines = logs[detector.name]
        for i, (t, _, msg) in enumerate(lines):
            m = _DEAD.search(msg)
            if m is None or m.group(1) not in by_short or t > run.final or t < run.started:
                continue
            subject = by_short[m.group(1)]
            if subject is detector:
                continue
            cls, delay = _classify(run, detector, subject, t, lines[i + 1:], lies.get(subject.node_id[:10], []))
            counts[cls] += 1
            if delay is not None:
                delays.append(delay)
            if cls not in ("during_fault",) and len(samples) < 40:
                samples.append({"t": round(t - run.started, 2), "detector": detector.name,
                                "subject": subject.name, "class": cls})
    false = counts["false_subject_frozen"] + counts["false_detector_frozen"] + counts["false_other"]
    return {"false_deaths": false, "false_subject_frozen": counts["false_subject_frozen"],
            "false_detector_frozen": counts["false_detector_frozen"], "false_other": counts["false_other"],
            "lie_refuted": counts["lie_refuted"], "lie_not_refuted": counts["lie_not_refuted"],
            "lie_refute_delay_max_s": round(max(delays), 1) if delays else None,
            "during_fault": counts["during_fault"], "samples": samples}


def _classify(run: RunRecord, detector: MemberRecord, subject: MemberRecord, t: float,
              later: list[tuple[float, str, str]], lie_times: list[float]) -> tuple[str, float | None]:
    """The class of one death declaration, and for a refuted lie how long it took."""
    for kill in subject.kills:
        end = (kill.rejoined or kill.ready or kill.restarted or run.final) + KILL_GRACE_S
        if kill.at <= t <= end:
            return "during_fault", None
    if any(t - LIE_WINDOW_S <= lt <= t + LOG_SLACK_S for lt in lie_times):
        short = subject.node_id[:10]
        for lt, _, msg in later:
            if lt > run.final:
                break
            m = _JOINED.search(msg)
            if m is not None and m.group(1) == short:
                return "lie_refuted", lt - t
        return "lie_not_refuted", None
    if subject.frozen_near(t, FREEZE_WINDOW_S):
        return "false_subject_frozen", None
    if detector.frozen_near(t, FREEZE_WINDOW_S):
        return "false_detector_frozen", None
    return "false_other", None


def _rounds(run: RunRecord) -> dict[str, Any]:
    slots: dict[int, list[dict[str, Any]]] = {}
    for lines in run.rounds.values():
        for line in lines:
            if line.get("started", run.chaos_end) >= run.baseline - 10:
                slots.setdefault(int(line["slot"]), []).append(line)
    trainers = len(run.rounds)
    attempted = completed = degraded = failed = wrong = 0
    errors: Counter[str] = Counter()
    for lines in slots.values():
        ran = [ln for ln in lines if not ln.get("skipped")]
        if not ran:
            continue
        attempted += 1
        oks = [ln for ln in ran if ln.get("ok")]
        wrong += sum(1 for ln in oks if not ln.get("correct"))
        if len(oks) == trainers and all(ln.get("contributors") == trainers for ln in oks):
            completed += 1
        elif oks:
            degraded += 1
        else:
            failed += 1
        for ln in ran:
            if not ln.get("ok"):
                errors[str(ln.get("error", "?")).split(":")[0]] += 1
    return {"attempted": attempted, "completed": completed, "degraded": degraded, "failed": failed,
            "wrong_results": wrong, "errors": dict(errors)}


def _span(samples: list[tuple[float, int, int, int]], since: float) -> tuple[list[tuple[float, int, int, int]], bool]:
    """The samples of the last process from ``since``, and whether that process was the one
    running at ``since`` (a survivor of the whole measured span)."""
    after = [s for s in samples if s[0] >= since]
    if not after:
        return [], False
    pid = after[-1][1]
    mine = [s for s in after if s[1] == pid]
    return mine, after[0][1] == pid


def _slope_mib_per_min(points: list[tuple[float, int, int, int]]) -> float | None:
    if len(points) < 3 or points[-1][0] - points[0][0] < 20:
        return None
    ts = [p[0] / 60 for p in points]
    ys = [p[3] / 2**20 for p in points]
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    den = sum((t - mt) ** 2 for t in ts)
    return sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / den if den else None


def _member(run: RunRecord, m: MemberRecord, lockout_s: float, errors: list[tuple[float, str, str]]) -> tuple[dict[str, Any], list[str]]:
    fails: list[str] = []
    procs, survivor = _span(m.proc, run.baseline)
    final_metrics = [s for s in m.metrics if s[0] >= run.chaos_end]
    last = final_metrics[-1][2] if final_metrics else (m.metrics[-1][2] if m.metrics else {})
    base = procs[0] if procs else None
    end = procs[-1] if procs else None
    row: dict[str, Any] = {
        "name": m.name, "kind": m.kind, "id": m.node_id[:10], "restarts": len(m.kills),
        "freezes": len(m.freezes), "survivor": survivor,
        "fds_base": base[2] if base else None, "fds_final": end[2] if end else None,
        "fds_max": max((p[2] for p in m.proc), default=None),
        "links_final": last.get("links"), "links_max": max((s[2]["links"] for s in m.metrics), default=None),
        "members_max": max((s[2]["members"] for s in m.metrics), default=None),
        "rss_base_mib": round(base[3] / 2**20, 1) if base else None,
        "rss_final_mib": round(end[3] / 2**20, 1) if end else None,
        "rss_slope_mib_per_min": None, "errors": len(errors),
    }
    slope = _slope_mib_per_min(procs)
    row["rss_slope_mib_per_min"] = None if slope is None else round(slope, 2)
    for name in QUEUE_METRICS:
        row[f"{name}_max"] = max((s[2][name] for s in m.metrics), default=None)
        row[f"{name}_final"] = last.get(name)
    quiet = [(s[2]["loop_lag_seconds"], s[0]) for s in m.metrics if not m.frozen_near(s[0], 10.5 + 2)]
    worst, worst_t = max(quiet, default=(0.0, run.started))
    row["loop_lag_max_s"] = round(worst, 3)
    row["loop_lag_worst_t"] = round(worst_t - run.started, 1)
    row["loop_lag_worst_after"] = sorted({str(a["kind"]) for a in run.acts if a.get("to") == m.node_id
                                          and worst_t - LAG_WINDOW_S - 1.0 <= float(a["t"]) <= worst_t})
    row["loop_lag_max_incl_freezes_s"] = round(max((s[2]["loop_lag_max_seconds"] for s in m.metrics), default=0.0), 3)
    bound = 2 * run.peers + LINK_SLACK
    if row["links_final"] is not None and row["links_final"] > bound:
        fails.append(f"leak: {m.name} holds {row['links_final']:.0f} links after the quiet phase (bound {bound})")
    if survivor and base and end:
        if end[2] - base[2] > FD_SLACK:
            fails.append(f"leak: {m.name} fds {base[2]} -> {end[2]} (slack {FD_SLACK})")
        grown = (end[3] - base[3]) / 2**20
        if grown > max(RSS_SLACK_MIB, RSS_SLACK_FRACTION * base[3] / 2**20):
            fails.append(f"leak: {m.name} RSS grew {grown:.0f} MiB ({base[3] / 2**20:.0f} -> {end[3] / 2**20:.0f})")
    pending = row["allreduce_pending_bytes_max"]
    if pending is not None and pending > PENDING_BYTES_LIMIT:
        fails.append(f"leak: {m.name} held {pending / 2**20:.0f} MiB for rounds not started "
                     f"(limit {PENDING_BYTES_LIMIT >> 20} MiB)")
    misses, lockouts = _lockouts(m.answers, lockout_s)
    row["status_misses"], row["lockouts"] = misses, len(lockouts)
    for start, length in lockouts:
        fails.append(f"lock-out: {m.name} answered no status for {length:.1f}s from t={start - run.started:.1f}s")
    if m.final_fresh is False:
        fails.append(f"lock-out: {m.name} refused a fresh status connection at the end")
    for kill in m.kills:
        if kill.failed:
            fails.append(f"rejoin: {m.name} restarted at t={kill.at - run.started:.1f}s: {kill.failed}")
    for crash in m.crashes:
        fails.append(f"crash: {m.name} exited by itself (rc {crash.get('rc')}) at t={crash['t'] - run.started:.1f}s")
    if m.stop and (m.stop.get("rc") != 0 or m.stop.get("seconds", 0) > STOP_TIMEOUT_S):
        fails.append(f"crash: {m.name} at SIGTERM: rc {m.stop.get('rc')} after {m.stop.get('seconds')}s")
    return row, fails


def _lockouts(answers: list[tuple[float, str, bool]], lockout_s: float) -> tuple[int, list[tuple[float, float]]]:
    """(unanswered checks, [(start, length)] of runs of failures at least ``lockout_s`` long)."""
    misses, out = 0, []
    since: float | None = None
    for t, _, ok in sorted(answers):
        if ok:
            if since is not None and t - since >= lockout_s:
                out.append((since, t - since))
            since = None
        else:
            misses += 1
            since = t if since is None else since
    if since is not None and answers and max(a[0] for a in answers) - since >= lockout_s:
        out.append((since, max(a[0] for a in answers) - since))
    return misses, out


def analyze(run: RunRecord, *, lockout_s: float) -> dict[str, Any]:
    day = _day_start(run.started)
    logs = {m.name: parse_log(m.log_path, day, run.started) for m in run.members}
    failures: list[str] = []
    rows = []
    error_lines: Counter[str] = Counter()
    error_where: dict[str, set[str]] = {}
    for m in run.members:
        errs = [ln for ln in logs[m.name] if ln[1] in ("ERROR", "CRITICAL") and ln[0] >= run.started]
        for _, _, msg in errs:
            key = re.sub(r"[0-9a-f]{10,}|\d+(\.\d+)?", "#", msg.splitlines()[0])[:160]
            error_lines[key] += 1
            error_where.setdefault(key, set()).add(m.name)
        row, fails = _member(run, m, lockout_s, errs)
        rows.append(row)
        failures += fails
    rounds = _rounds(run)
    if rounds["wrong_results"]:
        failures.append(f"all-reduce: {rounds['wrong_results']} results differ from the exact mean")
    if not run.final_view_ok:
        failures.append("lock-out: the honest members had no identical view by the end of the heal phase")
    acts: Counter[str] = Counter(a["kind"] for a in run.acts if a.get("kind") != "stopped")
    acts_ok: Counter[str] = Counter(a["kind"] for a in run.acts if a.get("ok") and a.get("kind") != "stopped")
    bad_frames = Counter(str(a.get("detail", "")).split(":")[0] + (
        " closed" if "closed by the node" in str(a.get("detail")) or "reset" in str(a.get("detail")) else " open")
        for a in run.acts if a.get("kind") == "bad_frame" and a.get("ok"))
    restarts = [k for m in run.members for k in m.kills]
    return {
        "scenario": "chaos", "args": run.args,
        "seconds": round(run.final - run.started, 1),
        "kills": sum(1 for k in restarts if k.cause == "kill"), "crashes": sum(len(m.crashes) for m in run.members),
        "freezes": sum(len(m.freezes) for m in run.members), "skipped_faults": run.skipped_faults,
        "rejoins": len(restarts), "rejoins_failed": sum(1 for k in restarts if k.failed),
        "rejoins_slow": sum(1 for k in restarts if k.slow),
        "rejoin_max_s": max((round(k.rejoined - k.ready, 1) for k in restarts if k.rejoined and k.ready),
                            default=None),
        "heal_seconds": run.heal_seconds,
        "deaths": _deaths(run, logs), "rounds": rounds,
        "hostile_acts": {k: [acts[k], acts_ok[k]] for k in sorted(acts)},
        "bad_frames": dict(sorted(bad_frames.items())), "hostile_rc": run.hostile_rc,
        "members": rows,
        "error_lines": [{"line": k, "count": n, "nodes": sorted(error_where[k])}
                        for k, n in error_lines.most_common(30)],
        "final_view_ok": run.final_view_ok, "final_view_disagreements": run.final_view,
        "failures": failures, "ok": not failures,
    }


def load_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


# ------------------------------------------------------------------------- output


def _fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "-"
    return format(v, spec) if spec else str(v)


def render(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=200)
    d, r = report["deaths"], report["rounds"]
    a = report["args"]
    summary = Table(title=f"chaos: {a['nodes']} nodes + {a['trainers']} trainers, {report['seconds']}s, "
                          f"seed {a['seed']}", show_header=False)
    summary.add_column("what")
    summary.add_column("value")
    summary.add_row("faults", f"{report['kills']} kill -9 + restart, {report['freezes']} SIGSTOP freezes, "
                              f"{report['skipped_faults']} skipped (target busy)")
    summary.add_row("honest declared dead by honest", f"{d['false_deaths']} false ({d['false_subject_frozen']} "
                    f"while the subject was frozen, {d['false_detector_frozen']} while the detector was, "
                    f"{d['false_other']} other); not counted: {d['during_fault']} during kills")
    summary.add_row("deaths after a lie", f"{d['lie_refuted']} refuted (the slowest after "
                    f"{_fmt(d['lie_refute_delay_max_s'])}s), {d['lie_not_refuted']} not refuted")
    summary.add_row("all-reduce rounds", f"{r['completed']} completed of {r['attempted']} attempted "
                    f"({r['degraded']} with fewer contributors, {r['failed']} failed, {r['wrong_results']} wrong)"
                    + (f"; errors {r['errors']}" if r["errors"] else ""))
    summary.add_row("rejoins", f"{report['rejoins'] - report['rejoins_failed']} of {report['rejoins']} ok, "
                    f"{report['rejoins_slow']} slower than {a['rejoin_timeout']:g}s"
                    + (f" (slowest {report['rejoin_max_s']}s)" if report["rejoin_max_s"] is not None else ""))
    summary.add_row("one view again", "never" if report["heal_seconds"] is None
                    else f"{report['heal_seconds']}s after the quiet phase")
    summary.add_row("crashes", str(report["crashes"]))
    summary.add_row("hostile acts (sent / ok)", ", ".join(f"{k} {n}/{ok}" for k, (n, ok) in report["hostile_acts"].items()))
    summary.add_row("bad frames", ", ".join(f"{k} {n}" for k, n in report["bad_frames"].items()) or "-")
    con.print(summary)
    nodes = Table(title="per member (base -> final after the quiet phase; max over the run)")
    for col in ("member", "restarts", "fds", "links", "members", "bcast q", "dials q", "AR pend MiB",
                "RSS MiB", "RSS MiB/min", "lag s", "lag s (frozen)", "misses", "ev drop", "ERRORs"):
        nodes.add_column(col, justify="right")
    for m in report["members"]:
        pend = m["allreduce_pending_bytes_max"]
        nodes.add_row(
            f"{m['name']} {m['id']}", str(m["restarts"]),
            f"{_fmt(m['fds_base'])}->{_fmt(m['fds_final'])} ({_fmt(m['fds_max'])})",
            f"{_fmt(m['links_final'], '.0f')} ({_fmt(m['links_max'], '.0f')})",
            _fmt(m["members_max"], ".0f"),
            f"{_fmt(m['gossip_pending_broadcasts_final'], '.0f')} ({_fmt(m['gossip_pending_broadcasts_max'], '.0f')})",
            f"{_fmt(m['gossip_pending_dials_final'], '.0f')} ({_fmt(m['gossip_pending_dials_max'], '.0f')})",
            "-" if pend is None else f"{pend / 2**20:.1f}",
            f"{_fmt(m['rss_base_mib'])}->{_fmt(m['rss_final_mib'])}",
            _fmt(m["rss_slope_mib_per_min"]), _fmt(m["loop_lag_max_s"]), _fmt(m["loop_lag_max_incl_freezes_s"]),
            str(m["status_misses"]), _fmt(m["gossip_events_dropped_total_final"], ".0f"), str(m["errors"]))
    con.print(nodes)
    if report["error_lines"]:
        errs = Table(title="ERROR lines in the honest logs")
        errs.add_column("count", justify="right")
        errs.add_column("nodes")
        errs.add_column("line")
        for e in report["error_lines"]:
            errs.add_row(str(e["count"]), ",".join(e["nodes"]), e["line"])
        con.print(errs)
    lags = [f"{m['name']} {m['loop_lag_max_s']}s at t={m['loop_lag_worst_t']}s after {'+'.join(m['loop_lag_worst_after'])}"
            for m in report["members"] if m["loop_lag_max_s"] >= 0.25 and m["loop_lag_worst_after"]]
    if lags:
        con.print("worst event-loop stalls outside freezes, with the hostile acts to that member just before: "
                  + "; ".join(lags))
    if report["final_view_disagreements"]:
        con.print("final views disagree: " + "; ".join(report["final_view_disagreements"]))
    if report["failures"]:
        con.print("[bold red]FAIL[/]")
        for f in report["failures"]:
            con.print(f"  {f}")
    else:
        con.print("[bold green]OK[/]: no leak, lock-out or crash")
