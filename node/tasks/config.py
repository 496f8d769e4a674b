"""The node's task settings (``NodeConfig.tasks``; every field is a ``--task-*`` flag)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from node.tasks.coordinator import CoordinatorSettings
from node.tasks.engine import TaskSettings
from protocol.errors import ConfigError
from protocol.messages.tasks import MAX_REPLICAS

#: Installed modules every node lets tasks run: the project's built-in task functions.
BUILTIN_MODULES = ("node.tasks.builtins",)
#: Installed modules tasks of one kind may also run: the built-in training jobs.
KIND_MODULES = {"train": ("node.training.runner.charlm",)}

_PATTERN = re.compile(r"[A-Za-z_*?\[\]][A-Za-z0-9_.*?\[\]]*")


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskConfig:
    """What this node runs and keeps for tasks."""

    allow_modules: tuple[str, ...] = ()
    """More installed modules (fnmatch patterns, e.g. ``mylib.*``) whose functions tasks may
    run without a bundle; the project's own task modules (``BUILTIN_MODULES``) and a bundle's
    modules always may."""
    slots: float = 0.0
    """CPUs this node offers to subtasks; 0: every CPU it has."""
    replicas: int = 2
    """Members that keep a copy of each task's log besides its coordinator."""
    lease_s: float = 5.0
    """A running attempt whose worker sends no heartbeat for this long runs again elsewhere."""
    retain_s: float = 3600.0
    """Seconds a finished task's results stay available."""
    retain_mb: int = 512
    """Megabytes of finished tasks' inputs and results kept; the oldest go first."""
    max_tasks: int = 1024
    """Tasks one node coordinates or replicates at once."""

    def __post_init__(self) -> None:
        if type(self.allow_modules) is not tuple or not all(
                isinstance(p, str) and _PATTERN.fullmatch(p) for p in self.allow_modules):
            raise ConfigError(f"allow modules {self.allow_modules!r}: expected module name patterns")
        for name, lo, hi in (("slots", 0.0, 4096.0), ("lease_s", 0.1, 3600.0), ("retain_s", 0.0, 365 * 86400.0)):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or not lo <= value <= hi:
                raise ConfigError(f"task {name.replace('_', ' ')} {value!r}: expected a number in {lo:g}..{hi:g}")
        for name, lo, hi in (("replicas", 0, MAX_REPLICAS), ("retain_mb", 0, 1 << 20), ("max_tasks", 1, 1 << 20)):
            value = getattr(self, name)
            if type(value) is not int or not lo <= value <= hi:
                raise ConfigError(f"task {name.replace('_', ' ')} {value!r}: expected an integer in {lo}..{hi}")

    @property
    def allowed(self) -> tuple[str, ...]:
        """Every module pattern this node lets tasks run without a bundle."""
        return BUILTIN_MODULES + self.allow_modules

    def engine_settings(self) -> TaskSettings:
        return TaskSettings(
            coordinator=CoordinatorSettings(replicas=self.replicas, lease_s=self.lease_s),
            max_tasks=self.max_tasks, retain_s=self.retain_s, retain_bytes=self.retain_mb << 20)
