"""Tensors in, tensors out: numpy arrays and torch tensors as the flat float32 the mesh averages.

``flatten(tensor)`` gives a 1-D float32 C-contiguous numpy array (a view when the input is
already a contiguous float32 CPU array/tensor, else a converted copy) and a ``Restore`` that
turns the averaged flat array back into the caller's type, shape, dtype and device, either
as a new object or written into the input (``in_place``). torch is never imported here: a
torch tensor can only be passed in by a program that already imported it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from protocol.errors import ConfigError

Floats = NDArray[np.float32]


def is_torch_tensor(obj: object) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


@dataclass(frozen=True, slots=True)
class Restore:
    """How to hand an averaged flat array back as the caller's kind of tensor."""

    original: Any
    shape: tuple[int, ...]
    torch: bool

    def __call__(self, average: Floats, *, in_place: bool) -> Any:
        if self.torch:
            return _restore_torch(self.original, average, in_place=in_place)
        x: NDArray[Any] = self.original
        if in_place:
            if not _same_memory(x, average):  # the round wrote the input's own memory already
                np.copyto(x, average.reshape(self.shape), casting="unsafe")
            return x
        if average.dtype == x.dtype:
            return _writable(average).reshape(self.shape)
        return average.reshape(self.shape).astype(x.dtype)


def flatten(tensor: object) -> tuple[Floats, Restore]:
    """``(flat float32 values, restore)`` for a numpy array or torch tensor of floats."""
    if is_torch_tensor(tensor):
        return _flatten_torch(tensor), Restore(tensor, tuple(tensor.shape), True)  # type: ignore[attr-defined]
    if not isinstance(tensor, np.ndarray):
        raise ConfigError(f"all_reduce needs a numpy array or a torch tensor, got {type(tensor).__name__}")
    if tensor.dtype.kind != "f":
        raise ConfigError(f"all_reduce averages floating-point tensors, got dtype {tensor.dtype}")
    if tensor.size == 0:
        raise ConfigError("all_reduce needs a non-empty tensor")
    flat = np.ascontiguousarray(tensor, dtype=np.float32).reshape(-1)
    return flat, Restore(tensor, tuple(tensor.shape), False)


def _same_memory(x: NDArray[Any], average: Floats) -> bool:
    """Whether ``x`` is laid out exactly over ``average`` (the average was written in place)."""
    return (x.dtype == average.dtype and x.flags.c_contiguous and x.nbytes == average.nbytes
            and x.__array_interface__["data"][0] == average.__array_interface__["data"][0])


def _writable(a: Floats) -> Floats:
    """``a`` itself if it can be made writable (it owns its memory), else a copy."""
    if a.flags.writeable:
        return a
    if a.base is None:
        try:
            a.flags.writeable = True
            return a
        except ValueError:
            pass
    return a.copy()


def _flatten_torch(t: Any) -> Floats:
    import torch  # already imported: ``t`` is a torch tensor

    if not t.is_floating_point():
        raise ConfigError(f"all_reduce averages floating-point tensors, got {t.dtype}")
    if t.numel() == 0:
        raise ConfigError("all_reduce needs a non-empty tensor")
    flat = t.detach().to(device="cpu", dtype=torch.float32).contiguous().view(-1)
    out: Floats = flat.numpy()
    return out


def _restore_torch(original: Any, average: Floats, *, in_place: bool) -> Any:
    import torch

    if in_place:
        same = (original.device.type == "cpu" and original.dtype == torch.float32
                and _same_memory(original.detach().numpy(), average))
        if not same:  # else the round wrote the input's own memory already
            with torch.no_grad():
                original.copy_(torch.from_numpy(_writable(average)).view(tuple(original.shape)))
        return original
    result = torch.from_numpy(_writable(average)).view(tuple(original.shape))
    return result.to(device=original.device, dtype=original.dtype)
