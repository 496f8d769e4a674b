"""Prometheus metrics: every core's and service's pure ``stats()``, served over HTTP.

Theory of operation
-------------------
Nothing here keeps state of its own: ``Node.stats()`` merges the ``stats()`` of membership,
the pool and every service (``node.core.Stats``: name -> number, numbers by one label's
value, or a ``Histogram``) at the moment it is asked. ``METRICS`` names every metric once,
with its kind, its label and its help; ``exposition(stats)`` renders one snapshot in the
Prometheus text format (prometheus-client's families and encoder), and ``flatten(stats)``
gives the same samples as ``{"name{label=\\"v\\"}": value}`` for ``status --json``.

``MetricsServer`` answers ``GET /metrics`` on ``--metrics-listen HOST:PORT`` with
``asyncio.Protocol`` callbacks (no task per client): a request head is read up to
``MAX_REQUEST_BYTES`` within ``REQUEST_TIMEOUT_S``, answered, and the connection closed; at
most ``MAX_CLIENTS`` connections at once, further ones are closed at accept.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from prometheus_client.core import Metric

from node.config import Address
from node.core import Histogram, Stats
from protocol.errors import ConfigError

log = logging.getLogger("starmesh.metrics")

PREFIX = "starmesh_"
MAX_REQUEST_BYTES = 8192
REQUEST_TIMEOUT_S = 5.0
MAX_CLIENTS = 16


@dataclass(frozen=True, slots=True)
class MetricSpec:
    kind: Literal["counter", "gauge", "histogram"]
    help: str
    label: str | None = None


def _c(help_: str, label: str | None = None) -> MetricSpec:
    return MetricSpec("counter", help_, label)


def _g(help_: str, label: str | None = None) -> MetricSpec:
    return MetricSpec("gauge", help_, label)


#: Every metric a node serves (names without ``starmesh_``). The README lists them.
METRICS: Mapping[str, MetricSpec] = {
    "uptime_seconds": _g("Seconds since this node started."),
    # the event loop (node.looplag)
    "loop_lag_seconds": _g("Largest event-loop lag of the last 10 s: how late a 0.1 s timer ran."),
    "loop_lag_max_seconds": _g("Largest event-loop lag since this node started."),
    "loop_lag_tick_seconds": MetricSpec("histogram", "Event-loop lag of each 0.1 s timer tick."),
    "status_requests_total": _c("Status requests answered."),
    # membership (discovery.Swim, node.membership)
    "members": _g("Members this node knows, by state (itself included).", "state"),
    "incarnation": _g("This node's own incarnation number."),
    "gossip_pending_broadcasts": _g("Gossip updates still queued for piggybacking."),
    "gossip_pending_dials": _g("Addresses with gossip waiting for a connection."),
    "gossip_dropped_messages_total": _c("Outgoing gossip dropped: outbox full between drains."),
    "gossip_broadcasts_dropped_total": _c("Gossip updates dropped: broadcast queue full."),
    "gossip_events_dropped_total": _c("Membership events dropped: event queue full."),
    "local_health": _g("Lifeguard local health multiplier (0: healthy; higher: slower to suspect)."),
    "probes_total": _c("Probes this node started."),
    "probe_failures_total": _c("Probes that got no ack, directly or indirectly."),
    "indirect_probes_total": _c("Probes that went on to indirect probes through k peers."),
    "suspicions_total": _c("Suspicions this node started."),
    "refutations_total": _c("Claims about this node it refuted with a higher incarnation."),
    "push_pull_rounds_total": _c("Push/pull anti-entropy exchanges this node started."),
    "implausible_claims_total": _c("Claims about this node refused as implausible (far above its "
                                   "incarnation) instead of refuted."),
    # connections (node.pool, node.transport)
    "connections": _g("Open connections by channel (handshaking: not yet authenticated).", "channel"),
    "sent_bytes_total": _c("Bytes written to connections (frames, encryption included).", "channel"),
    "received_bytes_total": _c("Bytes read from connections.", "channel"),
    "sent_frames_total": _c("Frames (messages) written.", "channel"),
    "received_frames_total": _c("Frames (messages) received and decoded.", "channel"),
    "dropped_messages_total": _c("Best-effort messages not written (link closed or backed up).",
                                 "channel"),
    "rejected_peers_total": _c("Connections closed for the peer's fault, by reason.", "reason"),
    "evicted_handshakes_total": _c("Half-open inbound connections closed to make room, by the limit "
                                   "that was reached.", "limit"),
    "closed_client_connections_total": _c("Status-client connections closed, by why (budget: to make "
                                          "room; idle: client idle timeout).", "why"),
    "unknown_members_refused_total": _c("Unknown members ignored past the per-sender admission bound "
                                        "(fake-member floods: discovery.config.FloodPolicy)."),
    # submitters (node.submitters.service)
    "submitters_granted": _g("Keys that may submit work now (the owner not counted)."),
    "submitters_log_version": _g("Entries in this node's signed log of grants and revocations."),
    "submitters_entries_applied_total": _c("Grant/revoke entries accepted into the log."),
    "submitters_entries_rejected_total": _c("Grant/revoke entries refused (bad signature, gap...)."),
    "submitters_forks_total": _c("Entries refused because they build on another history."),
    "submitters_lists_total": _c("Submitter list requests served."),
    "submitters_updates_total": _c("Grant/revoke requests from clients."),
    "submitters_pages_sent_total": _c("Pages of log entries sent to catching-up members."),
    "submitters_syncs_sent_total": _c("Log version announcements sent (anti-entropy)."),
    "submitters_persist_failures_total": _c("Failed writes of the submitters log to disk."),
    # tasks (node.tasks.service, node.tasks.engine, node.process_pool)
    "tasks_coordinating": _g("Tasks this node coordinates."),
    "tasks_replicating": _g("Tasks this node keeps a replica of."),
    "tasks_worker_attempts": _g("Attempts this node runs or queues as a worker."),
    "tasks_created_total": _c("Tasks created with this node as coordinator."),
    "tasks_takeovers_total": _c("Tasks this node took over from a coordinator that left."),
    "tasks_deposed_total": _c("Tasks this node stopped coordinating for a higher ballot."),
    "tasks_attempts_run_total": _c("Attempts accepted as a worker."),
    "tasks_attempts_refused_total": _c("Attempts refused as a worker (stale ballot, busy)."),
    "tasks_results_sent_total": _c("Subtask outcomes sent to coordinators."),
    "task_submissions_total": _c("Submissions that passed this node's checks."),
    "task_submissions_refused_total": _c("Submissions refused (unauthorized, malformed, not allowed)."),
    "task_queries_total": _c("Task queries served (list, status, wait, results)."),
    "task_relayed_total": _c("Requests relayed to the member that holds the task."),
    "task_bundle_fetches_total": _c("Bundles fetched from a coordinator."),
    "training_seats_total": _c("Seats of training jobs this node ran."),
    "training_seats_failed_total": _c("Seats that failed (the job's error, the process died, a round failed)."),
    "training_processes_started_total": _c("Training processes started (one per job this node works for)."),
    "training_rounds_total": _c("All-reduce rounds the training processes asked for."),
    "training_state_fetches_total": _c("State blobs fetched because the training process did not hold a seat's state."),
    "training_processes": _g("Training processes running."),
    "task_outbound_queued": _g("Task messages queued for other members."),
    "task_outbound_dropped_total": _c("Task messages dropped (queue full or member unreachable)."),
    "task_processes_started_total": _c("Worker processes started."),
    "task_processes_live": _g("Worker processes alive."),
    "task_processes_warm": _g("Idle worker processes kept warm."),
    "task_attempts_running": _g("Attempts running in worker processes."),
    "task_subtask_failures_total": _c("Subtasks that failed in a worker process (any reason)."),
    # blobs (node.blobs.service, node.blobs.store, node.blobs.replicas, node.blobs.directory)
    "blob_store_bytes": _g("Bytes of blobs in this node's store (complete and being fetched)."),
    "blob_store_limit_bytes": _g("The store's bound (--blob-cache-bytes)."),
    "blob_store_blobs": _g("Complete blobs held here."),
    "blob_store_pinned": _g("Blobs pinned here (never evicted)."),
    "blob_store_partial": _g("Blobs being fetched here."),
    "blob_store_evictions_total": _c("Unpinned blobs evicted to make room."),
    "blob_store_evicted_bytes_total": _c("Bytes of blobs evicted to make room."),
    "blob_fetches_active": _g("Blob fetches in progress."),
    "blob_directory_records": _g("Blobs whose holders this node records (it ranks first for them)."),
    "blob_interested_records": _g("(member, blob) records of who asked for a blob here, told what it gains."),
    "blob_lookups_total": _c("Directory lookups for more holders during fetches (every second, backing off)."),
    "blob_holders_found_total": _c("Holders those lookups found that the fetch did not know."),
    "blob_fetches_total": _c("Blob fetches started."),
    "blob_bad_manifests_total": _c("Manifests refused (wrong digest, malformed)."),
    "blob_fetched_bytes_total": _c("Verified chunk bytes fetched from peers."),
    "blob_blamed_total": _c("Peers blamed for a chunk that did not verify."),
    "blob_busy_total": _c("Chunk requests answered busy (upload slots full)."),
    "blob_uploaded_bytes_total": _c("Chunk bytes sent to peers, after zstd."),
    "blob_uploaded_raw_bytes_total": _c("Chunk bytes sent to peers, before zstd."),
    "blob_store_held": _g("Blobs kept from eviction for other members' leases (replicate)."),
    "blob_directory_expired_total": _c("Directory records swept after their TTL ran out unrenewed."),
    "blob_replicated_blobs": _g("Blobs this node keeps leased copies of on other members."),
    "blob_replica_copies": _g("Leased copies confirmed on other members (all blobs)."),
    "blob_replica_asks_total": _c("BLOB_LEASE requests sent (first asks, polls and renewals)."),
    "blob_replica_misses_total": _c("BLOB_LEASE requests that went unanswered."),
    "blob_replica_refused_total": _c("Copies refused or failed by the member asked (replaced)."),
    "blob_replica_lost_total": _c("Copies whose member left or died (replaced)."),
    "blob_replica_released_total": _c("Blobs whose copies were released."),
    "blob_leases_granted": _g("Leases this node grants others now."),
    "blob_lease_granted_total": _c("Leases granted (renewals not counted)."),
    "blob_lease_refused_total": _c("Leases refused past the bound."),
    "blob_lease_expired_total": _c("Leases that ran out unrenewed."),
    # all-reduce (node.allreduce.service)
    "allreduce_rounds_total": _c("All-reduce rounds ended here, by outcome.", "outcome"),
    "allreduce_round_seconds": MetricSpec("histogram", "Duration of finished all-reduce rounds."),
    "allreduce_rounds_active": _g("All-reduce rounds running here."),
    "allreduce_pending_rounds": _g("Round ids with messages held for a round not started here."),
    "allreduce_pending_bytes": _g("Bytes of messages held for rounds not started here."),
    "allreduce_dropped_messages_total": _c("All-reduce messages dropped, by reason.", "reason"),
    "allreduce_tensor_bytes_total": _c("Tensor chunk payload bytes, by direction.", "direction"),
}

_UNKNOWN = _g("(no description)", "key")


def spec_of(name: str, value: object) -> MetricSpec:
    """The spec of ``name``; one not in ``METRICS`` is served as an undocumented gauge."""
    spec = METRICS.get(name)
    if spec is not None:
        return spec
    return MetricSpec("histogram", "(no description)") if isinstance(value, Histogram) else _UNKNOWN


def families(stats: Stats) -> Iterable[Metric]:
    """prometheus-client metric families for one snapshot of ``stats`` (prometheus-client is
    imported here, on the first scrape: a node without ``--metrics-listen`` never loads it)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    for name in sorted(stats):
        value = stats[name]
        spec = spec_of(name, value)
        full = PREFIX + name
        if isinstance(value, Histogram):
            yield HistogramMetricFamily(full, spec.help,
                                        buckets=[(le, float(n)) for le, n in value.cumulative()],
                                        sum_value=value.total)
            continue
        family_type = CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily
        if isinstance(value, Mapping):
            label = spec.label or "key"
            family = family_type(full, spec.help, labels=[label])
            for key in sorted(value):
                family.add_metric([str(key)], float(value[key]))
        else:
            family = family_type(full, spec.help, value=float(value))
        yield family


class _Snapshot:
    """A one-shot prometheus-client collector over one ``stats`` snapshot."""

    def __init__(self, stats: Stats) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        return families(self._stats)


def exposition(stats: Stats) -> bytes:
    """``stats`` in the Prometheus text exposition format (version 0.0.4)."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(stats))
    return bytes(generate_latest(registry))


def flatten(stats: Stats) -> dict[str, float]:
    """Every sample as ``{"name{label=\\"value\\"}": number}`` (histograms: ``_count``,
    ``_sum`` and ``_bucket{le=...}``), names without the prefix."""
    out: dict[str, float] = {}
    for name in sorted(stats):
        value = stats[name]
        if isinstance(value, Histogram):
            out[f"{name}_count"] = float(value.count)
            out[f"{name}_sum"] = value.total
            for le, n in value.cumulative():
                out[f'{name}_bucket{{le="{le}"}}'] = float(n)
        elif isinstance(value, Mapping):
            label = spec_of(name, value).label or "key"
            for key in sorted(value):
                out[f'{name}{{{label}="{key}"}}'] = float(value[key])
        else:
            out[name] = float(value)
    return out


class _Request(asyncio.Protocol):
    """One HTTP/1.x request on the metrics port: read the head, answer, close."""

    def __init__(self, server: MetricsServer) -> None:
        self._server = server
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        if len(self._server.clients) >= MAX_CLIENTS:
            transport.close()
            return
        self._server.clients.add(self)
        self._timer = asyncio.get_running_loop().call_later(REQUEST_TIMEOUT_S, transport.close)

    def data_received(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        self._buf += data
        if b"\r\n\r\n" in self._buf or b"\n\n" in self._buf:
            self._answer(bytes(self._buf.split(b"\n", 1)[0]))
        elif len(self._buf) > MAX_REQUEST_BYTES:
            self._respond(431, b"request header too large\n", "text/plain")

    def _answer(self, request_line: bytes) -> None:
        parts = request_line.decode("latin-1").split()
        if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
            self._respond(405, b"only GET /metrics\n", "text/plain")
            return
        path = parts[1].split("?", 1)[0]
        if path not in ("/metrics", "/"):
            self._respond(404, b"see /metrics\n", "text/plain")
            return
        try:
            body = exposition(self._server.source())
        except Exception:
            log.exception("metrics: collecting failed")
            self._respond(500, b"collecting metrics failed\n", "text/plain")
            return
        self._respond(200, b"" if parts[0] == "HEAD" else body, "text/plain; version=0.0.4; charset=utf-8")

    def _respond(self, code: int, body: bytes, content_type: str) -> None:
        assert self._transport is not None
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 431: "Request Header Fields Too Large",
                  500: "Internal Server Error"}[code]
        head = (f"HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        self._transport.write(head + body)
        self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._server.clients.discard(self)


class MetricsServer:
    """Serves ``exposition(source())`` at ``http://HOST:PORT/metrics``."""

    def __init__(self, source: Callable[[], Stats]) -> None:
        self.source = source
        self.clients: set[_Request] = set()
        self._server: asyncio.Server | None = None

    async def listen(self, address: Address) -> Address:
        """Bind and serve; returns the address bound (port 0 picks one)."""
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(lambda: _Request(self), address.host, address.port,
                                                    reuse_address=True)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {address}: {exc.strerror or exc}") from None
        host, port = self._server.sockets[0].getsockname()[:2]
        return Address(str(host), int(port))

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for client in list(self.clients):
            if client._transport is not None:
                client._transport.close()
