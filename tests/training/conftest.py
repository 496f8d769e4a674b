"""A tiny char GPT (1 layer, 32 wide, context 16) so the training tests run in a second or two."""

from __future__ import annotations

import pytest
import torch

TINY = {"n_layer": "1", "n_head": "2", "n_embd": "32", "block_size": "16", "batch_size": "4",
        "eval_batches": "2", "sample_chars": "20", "shards": "8"}


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    """The tests' own thread count (the runner never sets it at import)."""
    torch.set_num_threads(2)


@pytest.fixture
def tiny() -> dict[str, str]:
    return dict(TINY)
