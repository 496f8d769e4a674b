"""The exported model: pruning, int8 quantization, and the before/after report.

Pruning (``prune``) is global magnitude pruning (Han et al. 2015) with ``torch.nn.utils.prune``:
over the weights of every ``nn.Linear`` at once, the ``sparsity`` fraction with the smallest
absolute values become zero (L1 unstructured, one threshold across layers, so layers that matter
less lose more), and the masks are made permanent (``prune.remove``: plain parameters again, with
zeros). A weight tied to another module (the char GPT's head is its token embedding) is pruned
for both. A short fine-tune after it recovers most of the loss: ``fine_tune`` trains with the
job's optimizer and puts the zeros back after every step (projected gradient descent), so the
sparsity survives the fine-tune.

Quantization (``quantize_int8``) is dynamic int8 of the Linear layers: weights stored as int8
with one fp32 scale, activations quantized on the fly per batch. ``report`` measures what the
job's summary shows: parameters, nonzeros, exported file size, validation loss and CPU forward
latency.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import zstandard
from torch import nn
from torch.nn.utils import prune as torch_prune

from node.training.runner.job import Job


def linear_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(module, "weight")`` for every ``nn.Linear`` (what pruning and quantization touch)."""
    return [(m, "weight") for m in model.modules() if isinstance(m, nn.Linear)]


def prune(model: nn.Module, sparsity: float) -> None:
    """Zero the ``sparsity`` fraction of all Linear weights with the smallest magnitude, in place.

    Global L1-unstructured pruning, made permanent (module docstring). A weight shared by two
    Linear layers would be counted twice, so shared weights are pruned once.
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity {sparsity} must be in [0, 1)")
    targets: list[tuple[nn.Module, str]] = []
    seen: set[int] = set()
    for module, name in linear_weights(model):
        if id(getattr(module, name)) not in seen:
            seen.add(id(getattr(module, name)))
            targets.append((module, name))
    if sparsity == 0 or not targets:
        return
    torch_prune.global_unstructured(targets, pruning_method=torch_prune.L1Unstructured,
                                    amount=sparsity)
    for module, name in targets:
        torch_prune.remove(module, name)  # type: ignore[no-untyped-call]


def zero_masks(model: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """``(weight, weight != 0)`` for each Linear weight that has zeros (what pruning left)."""
    masks: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
    for module, name in linear_weights(model):
        weight = getattr(module, name)
        if isinstance(weight, nn.Parameter) and bool((weight == 0).any()):
            masks[id(weight)] = (weight, weight != 0)
    return list(masks.values())


def fine_tune(job: Job, model: nn.Module, cursors: Sequence[Sequence[tuple[int, int]]], *,
              optimizer: torch.optim.Optimizer | None = None) -> list[float]:
    """Train ``model`` one step per entry of ``cursors`` (the batches of that step), keeping the
    pruned zeros at zero; a fresh ``job.optimizer`` unless one is given. Returns the losses."""
    from node.training.runner.reference import train_step

    masks = zero_masks(model)
    optimizer = optimizer or job.optimizer(model.parameters())
    losses = []
    model.train()
    for step in cursors:
        losses.append(train_step(job, model, optimizer, step))
        with torch.no_grad():
            for weight, mask in masks:
                weight.mul_(mask)
    return losses


@dataclass(frozen=True, slots=True)
class Quantized:
    """A quantized copy of a model and the path that made it (for the job's summary)."""

    model: nn.Module
    method: str


#: What ``quantize_int8`` runs, as the summary names it.
INT8_METHOD = "torch.ao.quantization.quantize_dynamic(qint8, nn.Linear)"


def quantize_int8(model: nn.Module) -> Quantized:
    """A copy of ``model`` with every ``nn.Linear`` dynamically quantized to int8 (CPU inference).

    The one place the project quantizes, so the implementation can change under it. Today it is
    ``torch.ao.quantization.quantize_dynamic``, although torch.ao.quantization is deprecated
    (its successor is torchao): measured on torch 2.13, CPU, one thread, on a 512-2048-512 MLP, it
    ran 4.4x faster than fp32 at a 4x smaller file, while torchao 0.18's int8 configs
    (``Int8DynamicActivationInt8WeightConfig``, ``Int8WeightOnlyConfig``) ran 2-3.5x *slower*
    than fp32 on CPU. The deprecation warning is silenced here, where the choice is made.
    The model's own parameters are untouched (``quantize_dynamic`` copies).
    """
    from torch.ao import quantization as tq

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = tq.quantize_dynamic(  # type: ignore[no-untyped-call]
            copy.deepcopy(model).cpu().eval(), {nn.Linear}, dtype=torch.qint8)
    return Quantized(model=quantized, method=INT8_METHOD)


def _is_dynamic_linear(module: nn.Module) -> bool:
    from torch.ao.nn.quantized import dynamic

    return isinstance(module, dynamic.Linear)


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain tensors for ``model.safetensors``: parameters by name (tied ones once), and for a
    dynamically quantized Linear ``name``: ``name.weight`` (int8), ``name.weight_scale`` and
    ``name.weight_zero_point`` (per tensor, or per output channel), ``name.bias`` if any."""
    tensors = {name: p.detach() for name, p in model.named_parameters()}
    for name, module in model.named_modules():
        if not _is_dynamic_linear(module):
            continue
        weight, bias = module.weight(), module.bias()
        tensors[f"{name}.weight"] = weight.int_repr()
        if weight.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            tensors[f"{name}.weight_scale"] = torch.tensor([weight.q_scale()], dtype=torch.float32)
            tensors[f"{name}.weight_zero_point"] = torch.tensor([weight.q_zero_point()])
        else:
            tensors[f"{name}.weight_scale"] = weight.q_per_channel_scales().float()
            tensors[f"{name}.weight_zero_point"] = weight.q_per_channel_zero_points()
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach()
    return tensors


@dataclass(frozen=True, slots=True)
class ModelReport:
    """What the job's summary shows for one exported model (before or after)."""

    params: int
    """Weights and biases in the file (quantization scales and zero points not counted)."""
    nonzeros: int
    file_bytes: int
    """Size of its ``model.safetensors``."""
    zstd_bytes: int
    """That file compressed with zstd (level 3): where pruning's zeros save space."""
    val_loss: float
    ms_per_forward: float
    """Median CPU latency of one forward of ``example_input``, after a warm-up."""

    def as_dict(self) -> dict[str, Any]:
        return {"params": self.params, "nonzeros": self.nonzeros, "file_bytes": self.file_bytes,
                "zstd_bytes": self.zstd_bytes, "val_loss": self.val_loss,
                "ms_per_forward": self.ms_per_forward}


def report(model: nn.Module, evaluate: Callable[[nn.Module], float], example_input: Any, *,
           warmup: int = 3, repeats: int = 10) -> ModelReport:
    """Measure ``model`` (module docstring); threads are whatever the caller set."""
    from node.training.runner.reference import validation_loss
    from node.training.runner.state import model_bytes

    tensors = {n: t for n, t in model_tensors(model).items()
               if not n.endswith(("weight_scale", "weight_zero_point"))}
    blob = model_bytes(model)
    return ModelReport(
        params=sum(t.numel() for t in tensors.values()),
        nonzeros=sum(int(torch.count_nonzero(t)) for t in tensors.values()),
        file_bytes=len(blob),
        zstd_bytes=len(zstandard.ZstdCompressor(level=3).compress(blob)),
        val_loss=validation_loss(evaluate, model),
        ms_per_forward=forward_ms(model, example_input, warmup=warmup, repeats=repeats),
    )


def forward_ms(model: nn.Module, example_input: Any, *, warmup: int = 3, repeats: int = 10) -> float:
    """Median milliseconds of ``model(example_input)`` under ``no_grad`` in eval mode."""
    was_training = model.training
    model.eval()
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model(example_input)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    model.train(was_training)
    return 1000 * statistics.median(times)
