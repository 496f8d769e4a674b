"""Pruning, int8 quantization and the model report on the tiny char GPT."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from node.training.runner import charlm, export, reference, state


def _linear_zeros(model: nn.Module) -> tuple[int, int]:
    weights = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Linear)}
    return (sum(int((w == 0).sum()) for w in weights.values()),
            sum(w.numel() for w in weights.values()))


def test_prune_is_global_permanent_and_keeps_the_tie(tiny: dict[str, str]) -> None:
    job = charlm.make_job(tiny)
    model = job.model
    export.prune(model, 0.6)
    zeros, total = _linear_zeros(model)
    assert zeros == round(0.6 * total)
    assert all(isinstance(p, nn.Parameter) for _, p in model.named_parameters())
    assert not any("_orig" in n or "_mask" in n for n, _ in model.state_dict().items())
    assert model.lm_head.weight is model.wte.weight
    per_layer = [float((m.weight == 0).float().mean()) for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(set(per_layer)) > 1  # one global threshold, not the same fraction per layer
    with pytest.raises(ValueError):
        export.prune(model, 1.0)


def test_fine_tune_keeps_the_zeros_and_recovers(tiny: dict[str, str]) -> None:
    job = charlm.make_job(tiny | {"lr": "1e-2"})
    reference.train_reference(job, 30)
    export.prune(job.model, 0.7)
    zeros, _ = _linear_zeros(job.model)
    pruned = job.evaluate(job.model)
    losses = export.fine_tune(job, job.model,
                              [reference.round_robin(s, workers=1, shards=job.shards) for s in range(30, 45)])
    assert len(losses) == 15
    assert _linear_zeros(job.model)[0] >= zeros
    assert job.evaluate(job.model) < pruned


def test_quantize_int8_is_a_smaller_copy_that_still_predicts(tiny: dict[str, str]) -> None:
    job = charlm.make_job(tiny | {"lr": "1e-2"})
    reference.train_reference(job, 20)
    before = [p.detach().clone() for p in job.model.parameters()]
    quantized = export.quantize_int8(job.model)
    assert quantized.method == export.INT8_METHOD
    assert all(torch.equal(a, b) for a, b in zip(before, job.model.parameters(), strict=True))
    x, _ = job.batch(0, 0)
    with torch.no_grad():
        diff = (quantized.model(x) - job.model(x)).abs().max()
    assert float(diff) < 0.1
    tensors, _ = state.decode(state.model_bytes(quantized.model))
    assert tensors["blocks.0.c_fc.weight"].dtype == torch.int8
    assert tensors["lm_head.weight"].dtype == torch.int8
    assert abs(job.evaluate(quantized.model) - job.evaluate(job.model)) < 0.05


def test_report(tiny: dict[str, str]) -> None:
    job = charlm.make_job(tiny)
    x, _ = job.batch(0, 0)
    dense = export.report(job.model, job.evaluate, x, warmup=1, repeats=2)
    assert dense.params == sum(p.numel() for p in job.model.parameters()) == dense.nonzeros
    assert dense.file_bytes == len(state.model_bytes(job.model)) > 4 * dense.params
    assert dense.val_loss == job.evaluate(job.model) and dense.ms_per_forward > 0
    export.prune(job.model, 0.5)
    sparse = export.report(job.model, job.evaluate, x, warmup=1, repeats=2)
    assert sparse.params == dense.params and sparse.nonzeros < 0.7 * dense.nonzeros
    assert sparse.file_bytes == dense.file_bytes and sparse.zstd_bytes < dense.zstd_bytes
    small = export.report(export.quantize_int8(job.model).model, job.evaluate, x, warmup=1, repeats=2)
    assert small.file_bytes < 0.5 * dense.file_bytes
    assert set(small.as_dict()) == {"params", "nonzeros", "file_bytes", "zstd_bytes", "val_loss",
                                    "ms_per_forward"}
