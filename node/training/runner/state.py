"""The shared training state as safetensors bytes, and back, bit-exact and byte-identical.

What is saved
-------------
``state_bytes(model, optimizer, outer=..., metadata=...)`` writes one safetensors file:

=================================  ==========================================================
``model/<name>``                   every parameter (``named_parameters()``: tied ones once)
``optim/<name>/<key>``             every tensor of the optimizer's per-parameter state
                                   (AdamW: ``exp_avg``, ``exp_avg_sq``, ``step``)
``outer/params``, ``outer/momentum``  DiLoCo's global parameters and Nesterov buffer, when given
``__metadata__``                   ``optimizer.param_groups`` (hyper-parameters, JSON, without
                                   the parameter lists) and the caller's ``metadata``
=================================  ==========================================================

Why the bytes are the same on every worker
------------------------------------------
A checkpoint is a blob named by the digest of these bytes, and workers that hold the same state
must write the same blob. So nothing in the file depends on the process: tensors are laid out in
a fixed order (by dtype size, then name, as the safetensors library does, which also aligns every
tensor to its element size), the header is JSON with sorted keys and no spaces, padded with
spaces to 8 bytes, and metadata holds only what the caller passes (no clock, host or path).

Why loading is bit-exact
------------------------
Tensors go through as raw little-endian bytes of their own dtype, and loading copies them into
the existing parameters (``param.copy_``) and hands the optimizer state to
``optimizer.load_state_dict``, which keeps dtype and values. Save, load, continue gives the same
parameters as never saving: ``tests/training/test_state.py`` checks it with ``torch.equal``.

The safetensors format (a little-endian u64 header length, that many bytes of JSON mapping each
name to ``dtype``, ``shape``, ``data_offsets``, then the data) is written here in a few lines,
so the project needs no extra package; any safetensors reader opens the files.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from node.training.runner.diloco import OuterOptimizer

#: safetensors dtype names.
DTYPES: Mapping[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}

#: A header bigger than this is refused (safetensors' own limit is 100 MB).
MAX_HEADER_BYTES = 100_000_000


class StateError(ValueError):
    """Bytes that are not a valid safetensors file, or a state that does not fit the model."""


# ----------------------------------------------------------------------------- safetensors


def encode(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """``tensors`` (CPU or not, any layout) and string ``metadata`` as safetensors bytes."""
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, Any] = {}
    blobs: list[bytes] = []
    offset = 0
    for name in order:
        tensor = tensors[name].detach()
        if tensor.dtype not in _NAMES:
            raise StateError(f"{name}: dtype {tensor.dtype} has no safetensors name")
        raw = _raw_bytes(tensor)
        header[name] = {"dtype": _NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = dict(metadata)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def decode(blob: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (fresh CPU tensors) and metadata of safetensors bytes; ``StateError`` if invalid."""
    if len(blob) < 8:
        raise StateError("shorter than a safetensors header")
    (size,) = struct.unpack("<Q", blob[:8])
    if size > min(MAX_HEADER_BYTES, len(blob) - 8):
        raise StateError(f"header of {size} bytes in a file of {len(blob)}")
    try:
        header = json.loads(blob[8:8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise StateError("header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise StateError("__metadata__ is not a map of strings")
    data = memoryview(blob)[8 + size:]
    tensors = {name: _tensor(name, entry, data) for name, entry in header.items()}
    return tensors, metadata


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _tensor(name: str, entry: Any, data: memoryview) -> torch.Tensor:
    try:
        dtype = DTYPES[entry["dtype"]]
        shape = [int(d) for d in entry["shape"]]
        begin, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise StateError(f"{name}: malformed header entry {entry!r}") from None
    count = 1
    for d in shape:
        count *= d
    itemsize = torch.empty((), dtype=dtype).element_size()
    if min(shape, default=0) < 0 or not 0 <= begin <= end <= len(data) or end - begin != count * itemsize:
        raise StateError(f"{name}: offsets {begin}..{end} do not hold {shape} of {entry['dtype']}")
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(bytearray(data[begin:end]), dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


# ----------------------------------------------------------------------------- training state


@dataclass
class Loaded:
    """What ``load_state`` found besides what it wrote into the model and optimizer."""

    metadata: dict[str, str] = field(default_factory=dict)
    """The caller's metadata as saved (``optimizer.param_groups`` removed)."""


def state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                  outer: OuterOptimizer | None = None) -> dict[str, torch.Tensor]:
    """The tensors of the shared state, by their names in the file (module docstring)."""
    tensors: dict[str, torch.Tensor] = {f"model/{name}": p for name, p in model.named_parameters()}
    if optimizer is not None:
        names = _param_names(model)
        for group in optimizer.param_groups:
            for param in group["params"]:
                for key, value in optimizer.state.get(param, {}).items():
                    if not isinstance(value, torch.Tensor):
                        raise StateError(f"optimizer state {key!r} is not a tensor")
                    tensors[f"optim/{names[param]}/{key}"] = value
    if outer is not None:
        tensors["outer/params"], tensors["outer/momentum"] = outer.params, outer.momentum
    return tensors


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                outer: OuterOptimizer | None = None,
                metadata: Mapping[str, str] | None = None) -> bytes:
    """The shared state as safetensors bytes, identical for identical states (module docstring)."""
    meta = dict(metadata or {})
    if optimizer is not None:
        meta["optimizer.param_groups"] = _groups_json(optimizer)
    return encode(state_tensors(model, optimizer, outer), meta)


def load_state(blob: bytes, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
               outer: OuterOptimizer | None = None) -> Loaded:
    """Write ``state_bytes``' state into ``model`` (and ``optimizer``, ``outer``) in place.

    The model must have the same parameter names and shapes (else ``StateError``); the file must
    hold optimizer or outer state exactly when they are passed.
    """
    tensors, metadata = decode(blob)
    _load_params(tensors, model)
    groups = metadata.pop("optimizer.param_groups", None)
    if optimizer is not None:
        if groups is None:
            raise StateError("the state has no optimizer")
        _load_optimizer(tensors, groups, model, optimizer)
    if outer is not None:
        outer.load(_take(tensors, "outer/params"), _take(tensors, "outer/momentum"))
    if optimizer is None:
        [tensors.pop(n) for n in list(tensors) if n.startswith("optim/")]
    if tensors:
        raise StateError(f"the state holds tensors nothing took: {sorted(tensors)[:5]}")
    return Loaded(metadata=metadata)


def model_bytes(model: nn.Module, metadata: Mapping[str, str] | None = None) -> bytes:
    """The exported model (``model.safetensors``): its parameters, or for a model whose Linear
    layers ``export.quantize_int8`` made int8, their int8 weights with scales and zero points
    (see ``export.model_tensors``)."""
    from node.training.runner.export import model_tensors

    return encode(model_tensors(model), metadata)


def _param_names(model: nn.Module) -> dict[nn.Parameter, str]:
    return {p: name for name, p in model.named_parameters()}


def _take(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise StateError(f"the state has no {name}")
    return tensors.pop(name)


def _load_params(tensors: dict[str, torch.Tensor], model: nn.Module) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            value = _take(tensors, f"model/{name}")
            if value.shape != param.shape or value.dtype != param.dtype:
                raise StateError(f"{name}: the state has {value.dtype}{list(value.shape)}, the model "
                                 f"{param.dtype}{list(param.shape)}")
            param.copy_(value)


def _groups_json(optimizer: torch.optim.Optimizer) -> str:
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return json.dumps(groups, sort_keys=True, separators=(",", ":"))


def _load_optimizer(tensors: dict[str, torch.Tensor], groups_json: str, model: nn.Module,
                    optimizer: torch.optim.Optimizer) -> None:
    """Rebuild ``optimizer.state_dict()``'s shape (states by parameter index) and load it."""
    groups = json.loads(groups_json)
    if len(groups) != len(optimizer.param_groups):
        raise StateError(f"the state has {len(groups)} optimizer groups, the optimizer "
                         f"{len(optimizer.param_groups)}")
    names = _param_names(model)
    state: dict[int, dict[str, torch.Tensor]] = {}
    index = 0
    for saved, group in zip(groups, optimizer.param_groups, strict=True):
        saved["params"] = list(range(index, index + len(group["params"])))
        for param in group["params"]:
            prefix = f"optim/{names[param]}/"
            keys = [n for n in tensors if n.startswith(prefix)]
            if keys:
                state[index] = {n[len(prefix):]: tensors.pop(n) for n in keys}
            index += 1
    optimizer.load_state_dict({"state": state, "param_groups": groups})
