"""Gradient averaging over the mesh from plain torch code: a DDP comm hook and a wrapper.

``DistributedDataParallel`` hands each gradient bucket to a *comm hook*; this one averages
the bucket over the mesh through a ``MeshNode`` (the synchronous handle of ``node.embedded``)
instead of over DDP's process group. Each host runs DDP on its own local process group
(world size 1, or its local GPUs with NCCL) and the mesh averages across hosts::

    mesh = MeshNode(NodeConfig(..., tags=("job=resnet",))).__enter__()
    group = mesh.wait_for_members(4, tag="job=resnet")   # this job's 4 hosts, no one else
    model = DistributedDataParallel(net)          # local process group
    model.register_comm_hook(MeshHookState(mesh, group, codec="int8+zstd"), mesh_allreduce_hook)

For models not wrapped in DDP, ``MeshGradientAverager(model.parameters(), mesh, group=...)``
averages every gradient in one all-reduce per ``step()`` (call it between ``backward()`` and
``optimizer.step()``), optionally with error feedback for lossy codecs (top-k).
Rounds are keyed by (iteration, bucket), so every member must run the same model with the
same buckets. Like ``MeshNode.all_reduce``, a round averaging fewer than ``min_contributors``
members (default 2) raises ``TooFewContributors``: pass ``min_contributors=1`` to train on
alone when every peer is gone. torch is imported only by this module.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from node.allreduce import AllReduceOutcome
from node.allreduce.config import AllReduceConfig
from node.embedded import GroupSpec, MeshNode
from protocol.tensor import ErrorFeedback


@dataclass
class MeshHookState:
    """What ``mesh_allreduce_hook`` needs; pass it as ``state`` to ``register_comm_hook``."""

    mesh: MeshNode
    group: GroupSpec
    codec: str = "none"
    timeout: float | None = None
    """Seconds per bucket all-reduce (None: the all-reduce's default deadlines)."""
    config: AllReduceConfig | None = None
    """Deadlines and exclusion rules of each round (e.g. ``outlier_factor``); None: defaults."""
    min_contributors: int | None = None
    """Fewest members a bucket's average may cover (None: 2); fewer raise ``TooFewContributors``."""
    iteration: int = 0
    """Backward passes so far (advanced after each iteration's last bucket)."""
    outcomes: dict[int, AllReduceOutcome] = field(default_factory=dict)
    """Bucket index -> outcome of its latest all-reduce (contributors, dropped peers)."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def mesh_allreduce_hook(state: MeshHookState, bucket: Any) -> Any:
    """A DDP comm hook: average ``bucket.buffer()`` over ``state.group``; returns a
    ``torch.futures.Future`` of the averaged bucket (same dtype and device)."""
    import torch

    with state._lock:
        key = f"ddp:{state.iteration}:{bucket.index()}"
        if bucket.is_last():
            state.iteration += 1
    result: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    index = bucket.index()

    def done(f: concurrent.futures.Future[AllReduceOutcome]) -> None:
        try:
            outcome = f.result()
        except BaseException as exc:
            result.set_exception(exc)  # type: ignore[arg-type]
            return
        state.outcomes[index] = outcome
        result.set_result(outcome.tensor)

    try:
        future = state.mesh.all_reduce_future(bucket.buffer(), group=state.group, codec=state.codec,
                                              timeout=state.timeout, key=key, config=state.config,
                                              min_contributors=state.min_contributors)
    except BaseException as exc:
        result.set_exception(exc)  # type: ignore[arg-type]
        return result
    future.add_done_callback(done)
    return result


# DDP checks the hook's annotations against torch's own types (GradBucket, Future[Tensor]);
# postponed (string) annotations fail that check, so the hook presents an unannotated signature.
_P = inspect.Parameter
mesh_allreduce_hook.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [_P("state", _P.POSITIONAL_OR_KEYWORD), _P("bucket", _P.POSITIONAL_OR_KEYWORD)])


class MeshGradientAverager:
    """Averages the gradients of ``parameters`` over the mesh in one all-reduce per ``step``.

    Every member must pass parameters of the same shapes in the same order. A parameter
    without a gradient contributes zeros (and gets the average). With ``error_feedback``
    the part of the gradient a lossy codec drops is added to the next step's gradient.
    ``min_contributors`` (None: 2) as in ``MeshNode.all_reduce``: a step whose average covers
    fewer members raises ``TooFewContributors`` and leaves the gradients untouched.
    """

    def __init__(self, parameters: Iterable[Any], mesh: MeshNode, *, group: GroupSpec,
                 codec: str = "none", timeout: float | None = None,
                 error_feedback: bool = False, config: AllReduceConfig | None = None,
                 min_contributors: int | None = None) -> None:
        import torch

        self.params = [p for p in parameters if p.requires_grad]
        self.mesh = mesh
        self.group = group
        self.codec = codec
        self.timeout = timeout
        self.config = config
        self.min_contributors = min_contributors
        self.numel = sum(p.numel() for p in self.params)
        self._flat = torch.zeros(self.numel, dtype=torch.float32)
        self.feedback = ErrorFeedback(self.numel) if error_feedback else None
        self.steps = 0
        self.last: AllReduceOutcome | None = None

    def step(self) -> AllReduceOutcome:
        """Average the current gradients in place (blocks until the round ends)."""
        import torch

        flat, pos = self._flat, 0
        with torch.no_grad():
            for p in self.params:
                n = p.numel()
                if p.grad is None:
                    flat[pos:pos + n].zero_()
                else:
                    flat[pos:pos + n].copy_(p.grad.reshape(-1))
                pos += n
            outcome = self.mesh.all_reduce(flat, group=self.group, codec=self.codec,
                                           timeout=self.timeout, key=f"avg:{self.steps}",
                                           feedback=self.feedback, in_place=True, config=self.config,
                                           min_contributors=self.min_contributors)
            pos = 0
            for p in self.params:
                n = p.numel()
                value = flat[pos:pos + n].view_as(p).to(p.dtype)
                if p.grad is None:
                    p.grad = value.clone().to(p.device)
                else:
                    p.grad.copy_(value)
                pos += n
        self.steps += 1
        self.last = outcome
        return outcome
