"""The shared state as safetensors: bit-exact resume, identical bytes, a strict reader."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from node.training.runner import charlm, diloco, reference, state
from node.training.runner.job import Job


def _train(job: Job, optimizer: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        reference.train_step(job, job.model, optimizer, reference.round_robin(step, workers=2, shards=job.shards))


def _snapshot(job: Job, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in state.state_tensors(job.model, optimizer).items()}


def test_save_load_continue_is_bit_exact(tiny: dict[str, str]) -> None:
    job = charlm.make_job(tiny)
    optimizer = job.optimizer(job.model.parameters())
    _train(job, optimizer, range(3))
    blob = state.state_bytes(job.model, optimizer, metadata={"step": "3"})
    _train(job, optimizer, range(3, 6))
    straight = _snapshot(job, optimizer)

    resumed = charlm.make_job(tiny)
    with torch.no_grad():
        for p in resumed.model.parameters():
            p.add_(1.0)  # values the load must overwrite
    resumed_opt = resumed.optimizer(resumed.model.parameters())
    loaded = state.load_state(blob, resumed.model, resumed_opt)
    assert loaded.metadata == {"step": "3"}
    _train(resumed, resumed_opt, range(3, 6))
    after = _snapshot(resumed, resumed_opt)
    assert straight.keys() == after.keys()
    assert any(n.endswith("/exp_avg_sq") for n in after) and any(n.endswith("/step") for n in after)
    for name in straight:
        assert torch.equal(straight[name], after[name]), name
    assert state.state_bytes(job.model, optimizer) == state.state_bytes(resumed.model, resumed_opt)


def test_identical_workers_write_identical_bytes(tiny: dict[str, str]) -> None:
    blobs = []
    for _ in range(2):
        job = charlm.make_job(tiny)
        optimizer = job.optimizer(job.model.parameters())
        outer = diloco.OuterOptimizer(job.model)
        _train(job, optimizer, range(2))
        outer.step(job.model, outer.pseudo_gradient(job.model))
        blobs.append(state.state_bytes(job.model, optimizer, outer=outer, metadata={"b": "1", "a": "2"}))
    assert blobs[0] == blobs[1]


def test_outer_state_round_trips(tiny: dict[str, str]) -> None:
    job = charlm.make_job(tiny)
    optimizer = job.optimizer(job.model.parameters())
    outer = diloco.OuterOptimizer(job.model)
    _train(job, optimizer, range(2))
    outer.step(job.model, outer.pseudo_gradient(job.model))
    blob = state.state_bytes(job.model, optimizer, outer=outer)
    other = charlm.make_job(tiny)
    other_outer = diloco.OuterOptimizer(other.model)
    state.load_state(blob, other.model, other.optimizer(other.model.parameters()), outer=other_outer)
    assert torch.equal(other_outer.params, outer.params)
    assert torch.equal(other_outer.momentum, outer.momentum) and bool(outer.momentum.any())
    with pytest.raises(state.StateError, match="nothing took"):
        state.load_state(blob, other.model, other.optimizer(other.model.parameters()))


def test_a_different_model_is_refused(tiny: dict[str, str]) -> None:
    blob = state.state_bytes(charlm.make_job(tiny).model)
    wider = charlm.make_job(tiny | {"n_embd": "64"})
    with pytest.raises(state.StateError, match="the state has"):
        state.load_state(blob, wider.model)


def test_codec_round_trips_every_dtype_and_aligns() -> None:
    tensors = {
        "f32": torch.randn(3, 4), "bf16": torch.randn(5).bfloat16(), "f16": torch.randn(2, 2).half(),
        "i8": torch.tensor([-3, 7], dtype=torch.int8), "i64": torch.arange(3), "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3), "bool": torch.tensor([True, False]), "view": torch.randn(4, 4).t(),
    }
    blob = state.encode(tensors, {"k": "v"})
    (size,) = struct.unpack("<Q", blob[:8])
    assert (8 + size) % 8 == 0
    header = json.loads(blob[8:8 + size])
    for entry in (v for k, v in header.items() if k != "__metadata__"):
        itemsize = {"F32": 4, "BF16": 2, "F16": 2, "I8": 1, "I64": 8, "BOOL": 1}[entry["dtype"]]
        assert entry["data_offsets"][0] % itemsize == 0
    decoded, metadata = state.decode(blob)
    assert metadata == {"k": "v"} and decoded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert decoded[name].dtype == tensor.dtype and torch.equal(decoded[name], tensor), name


@pytest.mark.parametrize("blob", [
    b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{}",
    struct.pack("<Q", 2) + b"[]",
    struct.pack("<Q", 4) + b"{{{{",
    struct.pack("<Q", 46) + b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}' + b"\0" * 8,
    struct.pack("<Q", 46) + b'{"a":{"dtype":"X32","shape":[1],"data_offsets":[0,4]}}' + b"\0" * 4,
    struct.pack("<Q", 47) + b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,40]}}' + b"\0" * 4,
    struct.pack("<Q", 29) + b'{"__metadata__":{"a":1}}     ',
])
def test_bad_files_are_state_errors(blob: bytes) -> None:
    with pytest.raises(state.StateError):
        state.decode(blob)


def test_model_bytes_is_the_parameters(tiny: dict[str, str]) -> None:
    job = charlm.make_job(tiny)
    tensors, metadata = state.decode(state.model_bytes(job.model, {"model": "charlm"}))
    assert metadata == {"model": "charlm"}
    assert tensors.keys() == dict(job.model.named_parameters()).keys()
    assert "lm_head.weight" not in tensors  # tied to wte.weight: saved once
