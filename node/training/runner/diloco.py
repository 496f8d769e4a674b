"""DiLoCo's outer optimizer: Nesterov SGD on the averaged pseudo-gradients.

Theory (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training of Language
Models", Algorithm 1)
----------------------------------------------------------------------------------------------
Every worker starts a round from the same global (outer) parameters ``θ``, runs ``H`` inner
steps of its own optimizer (AdamW) on its own shards, and ends at ``θ_i``. Its *pseudo-gradient*
is ``Δ_i = θ - θ_i``: the direction the inner steps moved, with the sign of a gradient. The
workers average them (the all-reduce, the caller's) into ``Δ = mean_i Δ_i`` and every worker
applies the same outer step, Nesterov momentum SGD (Sutskever et al. 2013, as
``torch.optim.SGD(nesterov=True, dampening=0)``)::

    b ← μ b + Δ            (momentum buffer, zero before the first round)
    θ ← θ - η (Δ + μ b)

with DiLoCo's ``η = 0.7``, ``μ = 0.9``; then the inner parameters restart from ``θ``. The inner
optimizer's state (AdamW moments) is kept across rounds, as in the paper. With ``η = 1, μ = 0``
this is plain parameter averaging (FedAvg).

``θ`` and ``b`` are flat fp32 vectors over ``model.parameters()`` in order (tied parameters once),
whatever the parameters' dtype: the outer step accumulates small differences that bf16 would
round away. They are part of the shared state (``state.state_bytes(outer=...)``): identical on
every worker, since every worker applies the same ``Δ`` to the same ``θ``.
"""

from __future__ import annotations

import torch
from torch import nn

#: DiLoCo's outer learning rate and Nesterov momentum.
OUTER_LR = 0.7
OUTER_MOMENTUM = 0.9


def flatten(model: nn.Module) -> torch.Tensor:
    """The model's parameters as one flat fp32 vector (``parameters()`` order), detached copy."""
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


def unflatten_into(model: nn.Module, flat: torch.Tensor) -> None:
    """Copy the flat vector into the model's parameters (cast to each parameter's dtype)."""
    total = sum(p.numel() for p in model.parameters())
    if flat.shape != (total,):
        raise ValueError(f"a flat vector of {tuple(flat.shape)} for {total} parameters")
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


def nesterov_step(params: torch.Tensor, momentum: torch.Tensor, grad: torch.Tensor, *,
                  lr: float, mu: float) -> None:
    """One Nesterov SGD step in place: ``b ← μb + g``; ``θ ← θ - lr (g + μb)``."""
    momentum.mul_(mu).add_(grad)
    params.sub_(grad.add(momentum, alpha=mu), alpha=lr)


class OuterOptimizer:
    """The global parameters and momentum of a DiLoCo job (module docstring).

    Per round: ``delta = outer.pseudo_gradient(model)`` after the inner steps; the caller averages
    ``delta`` over the round's workers; ``outer.step(model, averaged)`` updates ``θ`` and resets
    the model's parameters to it.
    """

    def __init__(self, model: nn.Module, *, lr: float = OUTER_LR,
                 momentum: float = OUTER_MOMENTUM) -> None:
        if lr <= 0 or not 0 <= momentum < 1:
            raise ValueError(f"outer lr {lr} must be positive and momentum {momentum} in [0, 1)")
        self.lr, self.mu = lr, momentum
        self.params = flatten(model)
        """``θ``: the global parameters, flat fp32, on the model's device."""
        self.momentum = torch.zeros_like(self.params)
        """``b``: the Nesterov buffer."""

    def pseudo_gradient(self, model: nn.Module) -> torch.Tensor:
        """``θ - θ_i``: flat fp32, on the device of ``θ`` (a new tensor the caller may keep)."""
        return self.params - flatten(model).to(self.params.device)

    def step(self, model: nn.Module, averaged: torch.Tensor) -> None:
        """Apply the averaged pseudo-gradient to ``θ`` and restart the model from ``θ``."""
        if averaged.shape != self.params.shape:
            raise ValueError(f"pseudo-gradient of {tuple(averaged.shape)}, parameters "
                             f"{tuple(self.params.shape)}")
        grad = averaged.to(self.params.device, torch.float32)
        nesterov_step(self.params, self.momentum, grad, lr=self.lr, mu=self.mu)
        unflatten_into(model, self.params)

    def load(self, params: torch.Tensor, momentum: torch.Tensor) -> None:
        """Restore ``θ`` and ``b`` from a checkpoint (``state.load_state``), bit-exact."""
        if params.shape != self.params.shape or momentum.shape != self.momentum.shape:
            raise ValueError(f"outer state of {tuple(params.shape)}, model has "
                             f"{tuple(self.params.shape)} parameters")
        self.params.copy_(params)
        self.momentum.copy_(momentum)
