"""``node.metrics``: stats snapshots rendered as Prometheus text and as flat samples."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from node.core import Histogram
from node.metrics import METRICS, exposition, flatten


def sample_stats() -> dict[str, object]:
    h = Histogram(bounds=(0.1, 1.0))
    for v in (0.05, 0.5, 0.7, 3.0):
        h.observe(v)
    return {
        "members": {"alive": 3.0, "suspect": 1.0},
        "sent_bytes_total": {"control": 10.0, "bulk": 2.0},
        "incarnation": 4,
        "allreduce_round_seconds": h,
    }


def test_histogram_is_cumulative() -> None:
    h = Histogram(bounds=(0.1, 1.0))
    for v in (0.05, 0.5, 0.7, 3.0, 1.0):
        h.observe(v)
    assert h.cumulative() == [("0.1", 1), ("1.0", 4), ("+Inf", 5)]
    assert h.count == 5 and abs(h.total - 5.25) < 1e-9


def test_exposition_parses_back_with_types_labels_and_prefix() -> None:
    text = exposition(sample_stats()).decode()  # type: ignore[arg-type]
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["starmesh_members"].type == "gauge"
    assert {(s.labels["state"], s.value) for s in families["starmesh_members"].samples} == {
        ("alive", 3.0), ("suspect", 1.0)}
    sent = families["starmesh_sent_bytes"]  # counters are exposed as <name>_total
    assert sent.type == "counter"
    assert {s.name for s in sent.samples} == {"starmesh_sent_bytes_total"}
    hist = families["starmesh_allreduce_round_seconds"]
    assert hist.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in hist.samples if s.name.endswith("_bucket")}
    assert buckets == {"0.1": 1.0, "1.0": 3.0, "+Inf": 4.0}
    assert "# HELP starmesh_incarnation This node's own incarnation number." in text


def test_flatten_names_each_sample_once() -> None:
    flat = flatten(sample_stats())  # type: ignore[arg-type]
    assert flat['members{state="alive"}'] == 3.0
    assert flat["incarnation"] == 4.0
    assert flat["allreduce_round_seconds_count"] == 4.0
    assert flat['allreduce_round_seconds_bucket{le="+Inf"}'] == 4.0


def test_every_spec_has_help_and_counters_end_in_total() -> None:
    for name, spec in METRICS.items():
        assert spec.help and not name.startswith("starmesh_")
        assert (spec.kind == "counter") == name.endswith("_total"), name
