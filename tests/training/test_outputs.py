"""The submitter's outputs: metrics rows, the summary, the live line, the out dir."""

from __future__ import annotations

import json
import math
from pathlib import Path

import msgpack
import pytest

from node.training import outputs, store
from protocol.messages.training import (
    Export,
    ExportQuantize,
    JobProgress,
    JobSpec,
    Option,
    SegmentRecord,
    ShardCursor,
)

A, B, C = (bytes([i]) * 32 for i in (1, 2, 3))
JOB = bytes(range(16))
PNG = b"\x89PNG\r\n\x1a\n"
SPEC = JobSpec(steps=8, segment_steps=4, options=(Option(key="n_layer", value="1"),),
               quantize=ExportQuantize.INT8, resume_from=bytes(16))
EXPORT = Export(model=b"\x09" * 32, sample="To be, or not\nto be", params=1000, nonzeros=900,
                file_bytes=4200, report=msgpack.packb({"before": {"val_loss": 2.5, "params": 1000},
                                                      "after": {"val_loss": 2.6}, "path": "torch.ao"}))


def _record(segment: int, start: int, losses: tuple[float, ...], *, group: tuple[bytes, ...] = (A, B),
            finished: tuple[bytes, ...] | None = None, wall_s: float = 4.0, val: float | None = None,
            checkpoint: bool = False, export: Export | None = None) -> SegmentRecord:
    return SegmentRecord(segment=segment, start=start, end=start + len(losses), group=group,
                         finished=group if finished is None else finished, losses=losses,
                         cursors=(ShardCursor(shard=0, position=start + len(losses)),),
                         state=bytes([16 + segment]) * 32, val_loss=val, tokens=400, bytes_sent=1_000_000,
                         wall_s=wall_s, compute_s=3.0, comm_s=1.0, checkpoint=checkpoint, export=export)


RECORDS = [
    _record(0, 0, (4.0, 3.8, 3.6, 3.4), val=3.5, checkpoint=True),
    _record(1, 4, (3.2, 3.0, 2.8, 2.6), group=(A, B, C), finished=(A, C), wall_s=2.0, val=2.7,
            export=EXPORT),
]


def test_one_row_per_step_then_val_rows() -> None:
    rows = outputs.metrics_rows(list(reversed(RECORDS)))  # any order in, step order out
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert [r["loss"] for r in train] == [4.0, 3.8, 3.6, 3.4, 3.2, 3.0, 2.8, 2.6]
    assert [r["workers"] for r in train] == [2] * 4 + [2] * 4
    assert [r["segment"] for r in train] == [0] * 4 + [1] * 4
    assert [(r["step"], r["val_loss"], r["wall_s"]) for r in val] == [(4, 3.5, 4.0), (8, 2.7, 6.0)]
    assert all("val_loss" not in r for r in train) and all("loss" not in r for r in val)
    assert rows[4] == val[0] and rows[-1] == val[1]  # right after its segment's last step


def test_wall_time_is_interpolated_and_monotone() -> None:
    rows = outputs.metrics_rows(RECORDS, started=10.0)
    walls = [r["wall_s"] for r in rows]
    assert walls == sorted(walls)
    train = [r["wall_s"] for r in rows if "loss" in r]
    assert train == pytest.approx([11, 12, 13, 14, 14.5, 15, 15.5, 16])


def test_segment_figures_ride_on_the_last_step_row() -> None:
    rows = outputs.metrics_rows(RECORDS)
    last0 = next(r for r in rows if r.get("step") == 4 and "loss" in r)
    assert last0["tokens"] == 400 and last0["tokens_s"] == 100.0 and last0["bytes_sent"] == 1_000_000
    assert last0["checkpoint"] is True and last0["compute_s"] == 3.0 and last0["comm_s"] == 1.0
    assert "tokens" not in rows[0]


def test_metrics_jsonl_is_one_strict_json_object_a_line() -> None:
    text = outputs.metrics_jsonl(outputs.metrics_rows(RECORDS))
    assert text.endswith("\n") and len(text.splitlines()) == 10
    assert all(isinstance(json.loads(x), dict) for x in text.splitlines())
    assert outputs.dumps({"x": math.nan, "b": b"\x01"}) == '{"x": null, "b": "01"}'


def test_summary() -> None:
    s = outputs.summary(job=JOB, spec=SPEC, records=RECORDS, out="run")
    assert s["job"] == JOB.hex() and s["mode"] == "sync"
    assert (s["steps"], s["steps_total"], s["segments"]) == (8, 8, 2)
    assert s["loss"] == pytest.approx(2.9)  # the last segment's (fewer than 10) steps
    assert (s["val_loss"], s["val_step"]) == (2.7, 8)
    assert s["workers_seen"] == [A.hex(), B.hex(), C.hex()] and s["workers"] == 3
    assert s["group"] == [A.hex(), C.hex()]
    assert (s["wall_s"], s["train_s"], s["tokens"], s["tokens_s"]) == (6.0, 6.0, 800, 800 / 6)
    assert s["bytes_sent"] == 2_000_000 and s["utilization"] == 1.0
    assert (s["checkpoint"], s["checkpoint_step"]) == ((b"\x10" * 32).hex(), 4)
    assert s["model"] == (b"\x09" * 32).hex() and s["out"] == "run"
    assert (s["params"], s["nonzeros"], s["file_bytes"]) == (1000, 900, 4200)
    assert s["report"] == {"before": {"val_loss": 2.5, "params": 1000}, "after": {"val_loss": 2.6},
                           "path": "torch.ao"}
    assert s["sample"] == "To be, or not\nto be"
    json.dumps(s, allow_nan=False)


def test_summary_prefers_the_progress_checkpoint_and_merges_its_workers() -> None:
    d = b"\x04" * 32
    p = JobProgress(function="jobs:charlm", mode="sync", step=8, steps=8, workers_seen=(B, d),
                    checkpoint=b"\x33" * 32, checkpoint_step=8)
    s = outputs.summary(job=JOB, spec=SPEC, records=RECORDS[:1], progress=p, wall_s=9.5)
    assert s["workers_seen"] == [A.hex(), B.hex(), d.hex()]
    assert (s["checkpoint"], s["checkpoint_step"], s["wall_s"]) == ((b"\x33" * 32).hex(), 8, 9.5)
    assert s["model"] is None and s["report"] is None and s["sample"] is None
    many = JobProgress(function="jobs:charlm", mode="sync", step=8, steps=8, workers_seen=(B,), seen=40)
    assert outputs.summary(job=JOB, spec=SPEC, records=RECORDS, progress=many)["workers"] == 40


def test_summary_of_no_records() -> None:
    s = outputs.summary(job=JOB, spec=SPEC, records=[])
    assert (s["steps"], s["loss"], s["val_loss"], s["workers"], s["utilization"]) == (0, None, None, 0, None)


def test_bad_report_is_none() -> None:
    assert outputs.decode_report(b"\xc1") is None and outputs.decode_report(b"") is None


def test_config_json() -> None:
    cfg = outputs.config_json(SPEC, {"n_layer": 1})
    assert cfg["steps"] == 8 and cfg["quantize"] == "int8" and cfg["resume_from"] == "00" * 16
    assert cfg["options"] == [{"key": "n_layer", "value": "1"}] and cfg["resume_state"] is None
    assert cfg["job_config"] == {"n_layer": 1}
    json.dumps(cfg, allow_nan=False)


def test_progress_line_and_eta() -> None:
    p = JobProgress(function="jobs:charlm", mode="sync", step=50, steps=200, live_step=53, loss=2.5,
                    val_loss=2.6, workers=(A, B, C), tokens_s=1234.4, bytes_sent=12_345_678,
                    waiting="waiting for 3 workers")
    line = outputs.progress_line(p, started=100.0, now=200.0)
    for part in ("step 50/200 (live 53)", "loss 2.500", "val 2.600", "1,234 tok/s", "3 workers",
                 "wire 12.3 MB", "1m40s elapsed", "ETA 5m00s", "[waiting for 3 workers]"):
        assert part in line, (part, line)
    assert outputs.eta(p, started=100.0, now=200.0, start_step=40) == pytest.approx(1500.0)
    fresh = JobProgress(function="jobs:charlm", mode="sync", step=0, steps=200)
    assert "ETA ?" in outputs.progress_line(fresh, started=0.0, now=5.0)
    assert "loss ?" in outputs.progress_line(fresh, started=0.0, now=5.0)
    done = JobProgress(function="jobs:charlm", mode="sync", step=200, steps=200)
    assert outputs.eta(done, started=0.0, now=5.0) == 0.0
    big = JobProgress(function="jobs:charlm", mode="sync", step=1, steps=2, workers=(A,), group_size=40)
    assert "40 workers" in outputs.progress_line(big, started=0.0, now=1.0)


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (59.4, "59s"), (60, "1m00s"),
                                               (3599, "59m59s"), (3600 + 5 * 60, "1h05m")])
def test_duration(seconds: float, text: str) -> None:
    assert outputs.duration(seconds) == text


def test_format_summary_ends_with_the_comparison() -> None:
    s = outputs.summary(job=JOB, spec=SPEC, records=RECORDS, out="run")
    text = outputs.format_summary(s, {"one process": 2.6, "nanoGPT (2000 steps)": 1.88})
    lines = text.splitlines()
    assert lines[-1] == "val loss 2.70 (3 nodes, 8 steps) vs 2.60 one process (+3.8%); " \
                        "vs 1.88 nanoGPT (2000 steps) (+43.6%)"
    assert "  to be" in lines and any("1,000 params" in x for x in lines)
    assert any(x.startswith("  before: val_loss 2.5") for x in lines)
    assert outputs.format_summary(s).splitlines()[-1] == "val loss 2.70 (3 nodes, 8 steps)"


def test_write_out(tmp_path: Path) -> None:
    out = tmp_path / "a" / "run"
    rows = outputs.metrics_rows(RECORDS)
    s = outputs.summary(job=JOB, spec=SPEC, records=RECORDS, out=str(out))
    written = store.write_out(out, spec=SPEC, records=RECORDS, model_bytes=b"model bytes", export=EXPORT,
                              summary=s, job_config={"n_layer": 1}, title="charlm",
                              reference={"one process": 2.6})
    assert [p.name for p in written] == ["model.safetensors", "config.json", "metrics.jsonl",
                                         "loss.png", "sample.txt", "summary.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written)  # no temporaries
    assert (out / "model.safetensors").read_bytes() == b"model bytes"
    assert (out / "loss.png").read_bytes().startswith(PNG)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == json.loads(json.dumps(rows))
    assert json.loads((out / "config.json").read_text())["job_config"] == {"n_layer": 1}
    assert json.loads((out / "summary.json").read_text()) == s
    assert (out / "sample.txt").read_text() == "To be, or not\nto be\n"


def test_write_out_without_model_or_sample(tmp_path: Path) -> None:
    written = store.write_out(tmp_path, spec=SPEC, records=RECORDS[:1], model_bytes=None, export=None,
                              summary={"job": JOB.hex()}, job_config=None)
    assert [p.name for p in written] == ["config.json", "metrics.jsonl", "loss.png", "summary.json"]


def test_plot_losses(tmp_path: Path) -> None:
    path = store.plot_losses(outputs.metrics_rows(RECORDS), tmp_path / "p" / "loss.png", title="t",
                             reference={"x": 3.0, "y": 2.0})
    assert path.read_bytes().startswith(PNG)
    assert outputs.loss_png([]).startswith(PNG)  # an empty history still draws


def test_exported_model_opens_with_safetensors(tmp_path: Path) -> None:
    safetensors = pytest.importorskip("safetensors")
    import torch

    from node.training.runner.state import model_bytes

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
    blob = model_bytes(model)
    store.write_out(tmp_path, spec=SPEC, records=RECORDS, model_bytes=blob, export=None,
                    summary={}, job_config=None)
    with safetensors.safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert keys and all(f.get_tensor(k).numel() > 0 for k in keys)
        weight = next(k for k in keys if k.endswith("0.weight"))
        assert torch.equal(f.get_tensor(weight), model[0].weight.detach())
