"""float32 <-> fp16 / bf16 through torch's vectorised casts, bit-exact with ``values``.

The numpy conversions in ``protocol.tensor.values`` are the reference (and the fallback
when torch is not installed): branch-free integer code, ~4.8 ms to encode 1M values to
fp16 and ~1.8 ms to decode. torch's casts use the CPU's conversion instructions: ~0.8 ms
of CPU each way here, repairs and slicing included, which matters because the fp16 codec
exists for fast links, where CPU is the limit. torch rounds to nearest even like the reference; the two differ only where the
reference defines its own non-finite results, so each function repairs exactly those
elements after the cast (rare: a NaN, an Inf, or a finite value beyond the format):

* finite values too large for the format saturate to the largest finite value;
* NaN becomes the canonical quiet NaN with the input's sign (0x7E00 / 0x7FC0);
* +-Inf stays +-Inf;
* decoding keeps a signalling NaN's bits (torch would set its quiet bit).

Every function returns None when torch is unavailable, and the caller uses the reference.
torch is imported on first use (not at import: ``python -m node status`` should not pay
for it). Inputs that numpy marks read-only are copied first (torch would warn on them).
Casts run GRAIN elements per torch call, on the calling thread (see ``GRAIN``).

Importing torch takes seconds, so it must never happen on a thread that may not wait (an
event loop: a node stalled by it missed its probes and was declared dead). Whoever runs such
threads installs an ``ImportGuard`` (``set_import_guard``; ``node.looplag.TorchImportGuard``
is the node's): on a thread where ``may_block()`` is false, a first call returns None at once
(the caller takes the bit-identical reference) and asks the guard to ``import_later()``,
which runs ``preload_torch()`` on a worker thread. (Even there the import holds the GIL in
stretches, longest in ``import torch._C``: measured on 2 cores, an event loop on another
thread stalls 0.15-0.45 s at worst instead of the whole import, 1.5-3 s. Mapping libtorch
first with a GIL-free ``dlopen`` was tried and is worse: the loader's lock then blocks any
thread that starts a thread, with the GIL held.)
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

#: Elements per torch call: at most ``at::internal::GRAIN_SIZE``, so torch casts on the
#: calling thread. The codec pool is the parallelism; torch's OpenMP workers would
#: spin-wait between calls (measured per 1M values: 3.3 ms CPU for one call, 0.85 sliced).
GRAIN = 32768
_F32_ABS = np.uint32(0x7FFFFFFF)
_F32_INF = np.uint32(0x7F800000)
_torch: Any = None
_tried = False


class ImportGuard(Protocol):
    """Where torch may be imported (``set_import_guard``)."""

    def may_block(self) -> bool:
        """Whether the calling thread may wait seconds for torch to import."""
        ...

    def import_later(self) -> None:
        """Arrange for ``preload_torch()`` to run on a thread that may wait (idempotent)."""
        ...


_guard: ImportGuard | None = None


def set_import_guard(guard: ImportGuard | None) -> None:
    """Install the process's ``ImportGuard`` (None: import on whichever thread asks first)."""
    global _guard
    _guard = guard


def import_guard() -> ImportGuard | None:
    """The installed ``ImportGuard`` (None: none)."""
    return _guard


def loaded() -> bool:
    """Whether the import was tried (torch is then available or known to be missing)."""
    return _tried


def torch_module() -> Any:
    """torch, imported once; None if it is not installed or does not import, or if it is not
    imported yet and the ``ImportGuard`` says this thread may not wait (then it imports in
    the background and a later call gets it)."""
    if _tried:
        return _torch
    guard = _guard
    if guard is not None and not guard.may_block():
        guard.import_later()
        return None
    return preload_torch()


def preload_torch() -> Any:
    """Import torch now, on the calling thread, whatever the guard says (so call it where
    waiting is fine); torch, or None if it is unavailable. Idempotent and thread-safe: racing
    callers all import (the import system serialises them) and get the same module."""
    global _torch, _tried
    if not _tried:
        try:
            module = importlib.import_module("torch")
        except Exception:  # not installed, or a broken install (e.g. missing CUDA libraries)
            module = None
        _torch, _tried = module, True
    return _torch


def _cast(torch: Any, array: NDArray[Any], dtype: Any) -> Any:
    """``array`` cast to torch ``dtype``, GRAIN elements per call (a new tensor)."""
    src = torch.from_numpy(array if array.flags.writeable else array.copy())
    out = torch.empty(src.numel(), dtype=dtype)
    for piece, source in zip(out.split(GRAIN), src.split(GRAIN), strict=True):
        piece.copy_(source)
    return out


def _special(bits: NDArray[np.uint16], exp_mask: int) -> NDArray[np.bool_] | None:
    """Where ``bits`` (fp16/bf16) has an all-ones exponent (NaN, Inf); None if nowhere."""
    special = (bits & np.uint16(exp_mask)) == exp_mask
    return special if special.any() else None


def _repair(values: NDArray[np.float32], bits: NDArray[np.uint16], *, exp_mask: int,
            nan: int, inf: int, max_finite: int) -> None:
    """Rewrite the elements whose result has an all-ones exponent to the reference's value."""
    special = _special(bits, exp_mask)
    if special is None:
        return
    idx = np.flatnonzero(special)
    src = values.view(np.uint32)[idx]
    mag = src & _F32_ABS
    fixed = np.where(mag > _F32_INF, nan, np.where(mag == _F32_INF, inf, max_finite)).astype(np.uint16)
    fixed |= ((src >> np.uint32(16)) & np.uint32(0x8000)).astype(np.uint16)
    bits[idx] = fixed


def to_half(values: NDArray[np.float32]) -> NDArray[np.float16] | None:
    """fp16 of ``values`` exactly as ``values.float_to_half`` gives it (None: no torch)."""
    torch = torch_module()
    if torch is None:
        return None
    half: NDArray[np.float16] = _cast(torch, values, torch.float16).numpy()
    _repair(values, half.view(np.uint16), exp_mask=0x7C00, nan=0x7E00, inf=0x7C00, max_finite=0x7BFF)
    return half


def from_half(half: NDArray[np.float16]) -> NDArray[np.float32] | None:
    """float32 of fp16 values, a new writable array (None: no torch)."""
    torch = torch_module()
    if torch is None:
        return None
    out: NDArray[np.float32] = _cast(torch, half, torch.float32).numpy()
    special = _special(half.view(np.uint16), 0x7C00)
    if special is not None:  # the reference keeps signalling NaNs signalling
        out[special] = half[special].astype(np.float32)
    return out


def to_bfloat16(values: NDArray[np.float32]) -> NDArray[np.uint16] | None:
    """bf16 bits of ``values`` exactly as ``values.float_to_bfloat16`` gives them (None: no torch)."""
    torch = torch_module()
    if torch is None:
        return None
    bits: NDArray[np.uint16] = _cast(torch, values, torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    _repair(values, bits, exp_mask=0x7F80, nan=0x7FC0, inf=0x7F80, max_finite=0x7F7F)
    return bits
