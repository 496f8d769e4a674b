"""The built-in char GPT job: identical on every worker, seeded, and it learns."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from node.training.runner import charlm, reference
from node.training.runner.job import Job


def _params(job: Job) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in job.model.named_parameters()}


def test_default_config_is_the_baby_gpt() -> None:
    config = charlm.CharConfig.from_options({})
    assert (config.n_layer, config.n_head, config.n_embd, config.block_size,
            config.batch_size, config.lr) == (4, 4, 128, 64, 12, 1e-3)
    model = charlm.build_model(config, vocab=65)
    assert sum(p.numel() for p in model.parameters()) == 804_096  # nanoGPT: 0.80M (+ wpe)
    assert model.lm_head.weight is model.wte.weight


def test_every_worker_builds_the_same_job(tiny: dict[str, str]) -> None:
    a, b = charlm.make_job(tiny), charlm.make_job(tiny)
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[n], pb[n]) for n in pa)
    assert all(torch.equal(u, v) for u, v in zip(a.batch(3, 17), b.batch(3, 17), strict=True))
    assert a.evaluate(a.model) == b.evaluate(b.model)
    assert a.sample is not None and b.sample is not None
    assert a.sample(a.model) == b.sample(b.model) and len(a.sample(a.model)) == 20
    assert a.tokens_per_batch == 4 * 16 and a.shards == 8 and a.grad_clip == 1.0
    assert a.config is not None and a.config["n_embd"] == 32
    other = charlm.make_job(tiny | {"seed": "2"})
    assert not torch.equal(_params(other)["wte.weight"], pa["wte.weight"])


def test_init_leaves_the_global_rng_alone(tiny: dict[str, str]) -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    charlm.make_job(tiny)
    assert torch.equal(torch.rand(3), expected)


def test_it_learns(tiny: dict[str, str]) -> None:
    job = charlm.make_job(tiny | {"lr": "1e-2"})
    before = job.evaluate(job.model)
    result = reference.train_reference(job, 50)
    assert before > 4.0  # about ln(65) at initialization
    assert result.val_loss < before - 0.8
    assert sum(result.losses[-5:]) / 5 < result.losses[0] - 0.8


def test_optimizer_decays_matrices_only(tiny: dict[str, str]) -> None:
    job = charlm.make_job(tiny)
    optimizer = job.optimizer(job.model.parameters())
    decay, rest = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in rest["params"])
    assert decay["betas"] == (0.9, 0.99)


def test_a_users_text_file(tmp_path: Path, tiny: dict[str, str]) -> None:
    path = tmp_path / "abc.txt"
    path.write_text("abcab" * 400)
    job = charlm.make_job(tiny | {"text": str(path)})
    assert job.config is not None and job.config["vocab"] == "abc"
    assert job.model.wte.weight.shape == (3, 32)
    x, _ = job.batch(0, 0)
    assert int(x.max()) <= 2


@pytest.mark.parametrize(("options", "message"), [
    ({"n_layers": "4"}, "unknown charlm options"),
    ({"lr": "fast"}, "not a float"),
    ({"n_embd": "30", "n_head": "4"}, "multiple of n_head"),
    ({"batch_size": "0"}, "at least 1"),
])
def test_bad_options_are_clear(options: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        charlm.CharConfig.from_options(options)
