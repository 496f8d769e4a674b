"""DiLoCo's outer step against a numpy Nesterov SGD, and its round-trip through the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from node.training.runner import diloco


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    return model


def _numpy_nesterov(theta: np.ndarray, grads: list[np.ndarray], lr: float, mu: float) -> np.ndarray:
    """Sutskever et al.'s Nesterov momentum as torch.optim.SGD(nesterov=True) writes it."""
    b = np.zeros_like(theta)
    for g in grads:
        b = mu * b + g
        theta = theta - lr * (g + mu * b)
    return theta


def test_outer_steps_match_numpy_nesterov() -> None:
    model = _model()
    outer = diloco.OuterOptimizer(model)
    theta0 = diloco.flatten(model).double().numpy()
    rng = np.random.default_rng(3)
    grads = [rng.standard_normal(theta0.shape).astype(np.float32) * 0.1 for _ in range(6)]
    for g in grads:
        outer.step(model, torch.from_numpy(g))
    expected = _numpy_nesterov(theta0, [g.astype(np.float64) for g in grads], 0.7, 0.9)
    np.testing.assert_allclose(outer.params.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(diloco.flatten(model), outer.params)  # inner params := outer params


def test_matches_torch_sgd_nesterov() -> None:
    model = _model()
    outer = diloco.OuterOptimizer(model, lr=0.5, momentum=0.8)
    theta = nn.Parameter(diloco.flatten(model).clone())
    sgd = torch.optim.SGD([theta], lr=0.5, momentum=0.8, nesterov=True)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        g = torch.randn(theta.shape, generator=gen)
        theta.grad = g.clone()
        sgd.step()
        outer.step(model, g)
    torch.testing.assert_close(outer.params, theta.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(outer.momentum, sgd.state[theta]["momentum_buffer"], rtol=0, atol=1e-6)


def test_pseudo_gradient_is_outer_minus_inner_and_fedavg_is_averaging() -> None:
    model = _model()
    outer = diloco.OuterOptimizer(model, lr=1.0, momentum=0.0)
    start = outer.params.clone()
    replicas = [_model(seed) for seed in (1, 2, 3)]
    deltas = []
    for replica in replicas:
        diloco.unflatten_into(replica, diloco.flatten(replica))  # a no-op round trip
        deltas.append(outer.pseudo_gradient(replica))
        assert torch.equal(deltas[-1], start - diloco.flatten(replica))
    outer.step(model, torch.stack(deltas).mean(0))
    mean = torch.stack([diloco.flatten(r) for r in replicas]).mean(0)
    torch.testing.assert_close(diloco.flatten(model), mean, rtol=0, atol=1e-6)


def test_shapes_are_checked() -> None:
    model = _model()
    outer = diloco.OuterOptimizer(model)
    with pytest.raises(ValueError, match="pseudo-gradient"):
        outer.step(model, torch.zeros(3))
    with pytest.raises(ValueError, match="momentum"):
        diloco.OuterOptimizer(model, momentum=1.0)
    with pytest.raises(ValueError, match="flat vector"):
        diloco.unflatten_into(model, torch.zeros(2))
