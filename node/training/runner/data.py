"""Training text and token data, and the windows a job reads from them, by (shard, position) cursor.

Theory of operation
-------------------
A token sequence of length ``n`` is cut, in each *epoch* ``e``, into ``W`` windows of ``block + 1``
tokens (an input of ``block`` tokens and the same shifted by one as its target) starting at
``offset(e) + i * block`` for ``i`` in ``range(W)``: non-overlapping, covering the text once.
The offset is drawn per epoch in ``[0, block)``, so every epoch sees the text cut at another
phase (what nanoGPT's uniformly random start positions give, without repeats within an epoch).
``W = (n - 2 * block) // block + 1`` does not depend on the offset, so every epoch has the same
windows count.

Virtual shard ``k`` of ``K`` owns the windows ``i`` with ``i % K == k`` (strided, so every shard
spans the whole text and shards are identically distributed: what DiLoCo's independent inner
steps want). A shard reads its windows as an endless stream: epoch ``e`` of shard ``k`` is a
permutation of its windows drawn from ``numpy``'s PCG64 seeded with ``(seed, k, e)``, and epochs
follow each other. Batch ``position`` of shard ``k`` is stream elements ``[position * B,
(position + 1) * B)``: random access (no state to carry, a resumed or reassigned shard computes
its batch from the cursor alone), deterministic on every machine, and a batch that runs past the
end of an epoch wraps into the next epoch's permutation; no window is read twice within a shard's
epoch and none is skipped.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import zstandard

from node import training_data
from node.training_data import DataError as DataError

#: The tiny Shakespeare text shipped in the package (karpathy/char-rnn's ``input.txt``).
SHAKESPEARE_RESOURCE = "data/tinyshakespeare.txt.zst"
SHAKESPEARE_BYTES = training_data.SHAKESPEARE_BYTES
SHAKESPEARE_SHA256 = training_data.SHAKESPEARE_SHA256


def shakespeare_bytes() -> bytes:
    """The shipped tiny Shakespeare, decompressed and checked against its sha256.

    Raises ``DataError`` if the packaged file is missing or does not match (a broken install).
    """
    try:
        packed = resources.files("node.training").joinpath(SHAKESPEARE_RESOURCE).read_bytes()
        raw = zstandard.ZstdDecompressor().decompress(packed, max_output_size=2 * SHAKESPEARE_BYTES)
    except (OSError, zstandard.ZstdError) as exc:
        raise DataError(f"cannot read the packaged {SHAKESPEARE_RESOURCE}: {exc}") from exc
    digest = hashlib.sha256(raw).hexdigest()
    if len(raw) != SHAKESPEARE_BYTES or digest != SHAKESPEARE_SHA256:
        raise DataError(f"packaged tiny Shakespeare is corrupt: {len(raw)} bytes, sha256 {digest}")
    return raw


def shakespeare_text() -> str:
    """The shipped tiny Shakespeare as text (ASCII)."""
    return shakespeare_bytes().decode("utf-8")


def read_text(path: str | Path) -> str:
    """A user's UTF-8 text file (``DataError`` if unreadable or not UTF-8)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read text file {path}: {exc}") from exc


def read_data_text(path: str | Path) -> tuple[str, str]:
    """A job's text data blob (``--data FILE``): its characters (UTF-8, else one per byte) and
    the sha256 of its bytes. ``DataError`` if unreadable or empty."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read the job's data {path}: {exc}") from exc
    if not raw:
        raise DataError(f"the job's data {path} is empty")
    return training_data.text_of(raw), hashlib.sha256(raw).hexdigest()


def read_data_tokens(path: str | Path) -> tuple[torch.Tensor, str]:
    """A job's token data blob (``--data DIR``, ``node.training_data``): the ids as one
    ``int64`` tensor and the sha256 of the blob's bytes. ``DataError``."""
    source = Path(path)
    ids = torch.from_numpy(training_data.read_tokens(source))
    digest = training_data.sha256_of(source) if source.is_file() else ""
    return ids, digest


def epoch_offset(seed: int, epoch: int, block: int) -> int:
    """Where epoch ``epoch``'s windows start, in ``[0, block)`` (seeded, module docstring)."""
    rng = np.random.Generator(np.random.PCG64([seed, 0x0FF5E7, epoch]))
    return int(rng.integers(block))


class Windows:
    """The windows of one token sequence, read by (shard, position) cursor (module docstring)."""

    def __init__(self, tokens: torch.Tensor, *, block: int, batch: int, shards: int, seed: int) -> None:
        if tokens.dim() != 1:
            raise DataError("tokens must be one-dimensional")
        if block < 1 or batch < 1 or shards < 1:
            raise DataError("block, batch and shards must be positive")
        count = (len(tokens) - 2 * block) // block + 1
        if count < shards:
            raise DataError(f"{len(tokens)} tokens make {count} windows of {block}: "
                            f"fewer than the {shards} shards")
        self.tokens = tokens.to(torch.int64)
        self.block, self.batch, self.shards, self.seed = block, batch, shards, seed
        self.count = count
        """Windows per epoch, over all shards."""

    def shard_size(self, shard: int) -> int:
        """Windows of shard ``shard`` in one epoch (``i % shards == shard``)."""
        return len(range(shard, self.count, self.shards))

    def window_start(self, index: int, epoch: int) -> int:
        """First token of window ``index`` in epoch ``epoch``."""
        return epoch_offset(self.seed, epoch, self.block) + index * self.block

    def stream(self, shard: int, element: int) -> tuple[int, int]:
        """(window index, epoch) of element ``element`` of shard ``shard``'s endless stream."""
        size = self.shard_size(shard)
        epoch, within = divmod(element, size)
        order = _permutation(self.seed, shard, epoch, size)
        return shard + int(order[within]) * self.shards, epoch

    def starts(self, shard: int, position: int) -> list[int]:
        """Token offsets of the windows of batch ``position`` of shard ``shard``."""
        if not 0 <= shard < self.shards or position < 0:
            raise DataError(f"no batch at shard {shard} position {position} "
                            f"(shards 0..{self.shards - 1}, positions >= 0)")
        first = position * self.batch
        return [self.window_start(*self.stream(shard, e)) for e in range(first, first + self.batch)]

    def batch_at(self, shard: int, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``position`` of shard ``shard``: inputs and targets, ``int64 [batch, block]``."""
        return gather(self.tokens, self.starts(shard, position), self.block)


def gather(tokens: torch.Tensor, starts: list[int], block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``tokens[s:s+block]`` and targets ``tokens[s+1:s+block+1]`` for each start."""
    index = torch.tensor(starts, dtype=torch.int64)[:, None] + torch.arange(block + 1)
    rows = tokens[index]
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


@lru_cache(maxsize=256)
def _permutation(seed: int, shard: int, epoch: int, size: int) -> np.ndarray:
    """Shard ``shard``'s window order in epoch ``epoch`` (PCG64 seeded with the triple)."""
    rng = np.random.Generator(np.random.PCG64([seed, shard, epoch]))
    order = rng.permutation(size)
    order.flags.writeable = False
    return order
