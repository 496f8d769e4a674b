"""The layers of DESIGN.md, kept true by an ``ast`` walk of every module's imports.

``check_tree(root)`` reads every ``.py`` file under ``protocol/``, ``discovery/``, ``node/`` and
``simulations/`` (imports at module level, in functions, and ``importlib.import_module`` /
``__import__`` with a literal name) and returns the rules it breaks; ``test_tree_is_layered``
asserts the real tree breaks none, and the synthetic trees below show each rule firing.

Kinds of module (decided by path and name only):

==============  =============================================================================
core            everything in ``protocol/`` and ``discovery/``; every module of a domain
                sub-package ``node/<domain>/`` not named below (its ``__init__`` included)
pure            the top-level ``node`` modules in ``PURE_NODE_MODULES``: sans-I/O like a core,
                but may use ``os`` / ``pathlib`` (paths, environment)
store           ``node/<domain>/store.py``: the domain's on-disk store (``os``, ``pathlib``,
                ``shutil``, ``tempfile``, ``time``; no sockets, processes or event loop)
service         ``node/<domain>/service.py``: the domain's one asyncio adapter
worker          ``worker.py`` / ``*_worker.py`` in ``node/`` or ``simulations/``: the entry point
                of a child process; may import anything. So is everything under
                ``node/training/runner/``: the torch side of a training job, which runs only in
                a job's worker process
runtime         every other top-level ``node/*.py``: the asyncio / I/O layer
simulation      everything else in ``simulations/``
==============  =============================================================================

Rules (the ``rule`` of a ``Violation``):

* ``direction``: protocol <- discovery <- node <- simulations; a package imports only itself
  and the packages to its left (``if TYPE_CHECKING:`` included: a type is a dependency too).
* ``io``: core, pure and store modules import none of ``IO_MODULES`` (a store may import
  ``time``); cores none of ``DISK_MODULES`` either (disk belongs in ``store.py``).
* ``random``: core, pure and store modules use no global RNG: ``random.Random`` (a type or an
  instance, seeded by whoever injects it) is the only name they may take from ``random``.
* ``impure-import``: core, pure and store modules import no project module that does I/O
  (runtime, service, worker, simulation; a core or pure module no store either), so a banned
  module cannot come in through the back door.
* ``worker``: nothing in ``node/`` except another worker imports a worker module: it runs in a
  child process and is started by name.
* ``service``: a service imports no other domain's ``service`` (it gets other services through
  its constructor).
* ``torch``: torch only in simulations, workers, and, inside functions only (imported on first
  use), the modules in ``TORCH_LAZY``.

Imports under ``if TYPE_CHECKING:`` never run, so they are exempt from every rule but
``direction``.
"""

from __future__ import annotations

import ast
import enum
import textwrap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Package -> rank: a module may import packages of its own rank or lower.
RANK: Mapping[str, int] = {"protocol": 0, "discovery": 1, "node": 2, "simulations": 3}

#: What sans-I/O code never imports: event loops, sockets, clocks, threads, processes.
IO_MODULES = frozenset({
    "asyncio", "concurrent", "multiprocessing", "selectors", "socket", "subprocess", "threading",
    "time", "uvloop",
})
#: The file system: a domain's ``store.py`` (and the runtime) only; also banned in protocol and
#: discovery.
DISK_MODULES = frozenset({"os", "pathlib", "shutil", "tempfile"})
#: What a ``store.py`` may import of ``IO_MODULES`` (file mtimes, ages).
STORE_MAY = frozenset({"time"})

#: Top-level ``node`` modules that must stay sans-I/O: the output convention of cores, the
#: configuration tree and its flag/environment generator, the numpy/torch array bridge, and
#: ``node/placement.py`` (rendezvous hashing, still to come), and ``node/files.py`` (the atomic
#: and key-file writers: ``os`` only, so every domain's ``store.py`` may use them).
PURE_NODE_MODULES = frozenset({
    "node/__init__.py", "node/arrays.py", "node/config.py", "node/core.py", "node/files.py",
    "node/options.py", "node/placement.py",
})

#: Modules that may import torch inside functions (never when they are imported themselves):
#: fastcast's cast kernels, the torch<->numpy bridge of ``node.arrays``, the DDP hook.
TORCH_LAZY = frozenset({"protocol/tensor/fastcast.py", "node/arrays.py", "node/torch_hooks.py"})


#: Child-process code by place rather than name: a training job's torch runner.
RUNNER_PREFIX = "node/training/runner/"


class Kind(enum.Enum):
    CORE = "core"
    PURE = "pure"
    STORE = "store"
    SERVICE = "service"
    WORKER = "worker"
    RUNTIME = "runtime"
    SIMULATION = "simulation"


SANS_IO = frozenset({Kind.CORE, Kind.PURE, Kind.STORE})


@dataclass(frozen=True, slots=True, order=True)
class Violation:
    path: str
    """Relative to the root, with ``/``."""
    line: int
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: [{self.rule}] {self.message}"


@dataclass(frozen=True, slots=True)
class Import:
    module: str
    """The dotted module imported (for ``from m import x``: ``m``, and ``m.x`` if that is a
    module of the tree)."""
    line: int
    lazy: bool
    """Inside a function: runs on first call, not when the importing module loads."""
    type_only: bool
    """Under ``if TYPE_CHECKING:``: never runs."""


def _is_worker(name: str) -> bool:
    return name == "worker" or name.endswith("_worker")


def kind_of(rel: str, *, pure: frozenset[str] = PURE_NODE_MODULES) -> Kind:
    """The kind of the module at ``rel`` (``"node/allreduce/round.py"``)."""
    parts = rel.removesuffix(".py").split("/")
    package, stem = parts[0], parts[-1]
    if package in ("protocol", "discovery"):
        return Kind.CORE
    if package == "simulations":
        return Kind.WORKER if _is_worker(stem) else Kind.SIMULATION
    if _is_worker(stem) or rel.startswith(RUNNER_PREFIX):
        return Kind.WORKER
    if len(parts) == 2:
        return Kind.PURE if rel in pure else Kind.RUNTIME
    if len(parts) == 3 and stem == "service":
        return Kind.SERVICE
    if len(parts) == 3 and stem == "store":
        return Kind.STORE
    return Kind.CORE


def module_name(rel: str) -> str:
    parts = rel.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Imports(ast.NodeVisitor):
    """Every import of one module, with where it sits (function level, TYPE_CHECKING)."""

    def __init__(self, module: str, is_package: bool, known: frozenset[str]) -> None:
        self.module = module
        self.is_package = is_package
        self.known = known
        self.found: list[Import] = []
        self._depth = 0
        self._type_only = 0

    def _add(self, module: str, node: ast.stmt | ast.expr) -> None:
        self.found.append(Import(module, node.lineno, self._depth > 0, self._type_only > 0))

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self._type_only += 1
            for stmt in node.body:
                self.visit(stmt)
            self._type_only -= 1
            for stmt in node.orelse:
                self.visit(stmt)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            parts = self.module.split(".")
            keep = len(parts) - node.level + (1 if self.is_package else 0)
            base = ".".join([*parts[:keep], *([base] if base else [])])
        self._add(base, node)
        for alias in node.names:
            if f"{base}.{alias.name}" in self.known:
                self._add(f"{base}.{alias.name}", node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        dynamic = (isinstance(func, ast.Name) and func.id in ("__import__", "import_module")) or (
            isinstance(func, ast.Attribute) and func.attr == "import_module"
        )
        if dynamic and node.args and isinstance(arg := node.args[0], ast.Constant) and isinstance(arg.value, str):
            self._add(arg.value, node)
        self.generic_visit(node)


def _global_random_uses(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """``(line, what)`` for every use of the ``random`` module other than ``random.Random``."""
    aliases = {a.asname or "random" for n in ast.walk(tree) if isinstance(n, ast.Import)
               for a in n.names if a.name == "random"}
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.module == "random" and not n.level:
            for a in n.names:
                if a.name != "Random":
                    yield n.lineno, f"from random import {a.name}"
        elif (isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
              and n.value.id in aliases and n.attr != "Random"):
            yield n.lineno, f"{n.value.id}.{n.attr}"


def _modules(root: Path) -> dict[str, Path]:
    """Relative path -> file, for every module of the four packages under ``root``."""
    out: dict[str, Path] = {}
    for package in RANK:
        base = root / package
        if base.is_dir():
            for path in sorted(base.rglob("*.py")):
                out[path.relative_to(root).as_posix()] = path
    return out


def check_tree(
    root: Path,
    *,
    pure: frozenset[str] = PURE_NODE_MODULES,
    torch_lazy: frozenset[str] = TORCH_LAZY,
) -> list[Violation]:
    """Every rule of this module's docstring that a module under ``root`` breaks, sorted."""
    files = _modules(root)
    by_name = {module_name(rel): rel for rel in files}
    known = frozenset(by_name)
    out: list[Violation] = []
    for rel, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        visitor = _Imports(module_name(rel), rel.endswith("__init__.py"), known)
        visitor.visit(tree)
        kind = kind_of(rel, pure=pure)
        for imp in visitor.found:
            out.extend(_check_import(rel, kind, imp, by_name, pure, torch_lazy))
        if kind in SANS_IO:
            for line, what in _global_random_uses(tree):
                out.append(Violation(rel, line, "random",
                                     f"{what}: the global RNG; take an injected random.Random"))
    # ``from a import b`` imports ``a`` and ``a.b``: one violation a line and rule (the later,
    # more specific one).
    return sorted({(v.path, v.line, v.rule): v for v in out}.values())


def _check_import(
    rel: str,
    kind: Kind,
    imp: Import,
    by_name: Mapping[str, str],
    pure: frozenset[str],
    torch_lazy: frozenset[str],
) -> Iterator[Violation]:
    top = imp.module.split(".")[0]
    package = rel.split("/")[0]
    if top in RANK and RANK[top] > RANK[package]:
        yield Violation(rel, imp.line, "direction", f"{package} imports {imp.module}")
        return
    if imp.type_only:
        return
    if kind in SANS_IO:
        banned = (IO_MODULES - STORE_MAY) if kind is Kind.STORE else IO_MODULES
        if kind is Kind.CORE:
            banned = banned | DISK_MODULES
        if top in banned:
            yield Violation(rel, imp.line, "io", f"{kind.value} module imports {imp.module}")
    if top == "torch" and kind not in (Kind.SIMULATION, Kind.WORKER):
        if rel not in torch_lazy:
            yield Violation(rel, imp.line, "torch", "imports torch (not in the torch allowlist)")
        elif not imp.lazy:
            yield Violation(rel, imp.line, "torch", "imports torch at module level (only inside functions here)")
    target = by_name.get(imp.module)
    if target is None or target == rel:
        return
    target_kind = kind_of(target, pure=pure)
    if target_kind is Kind.WORKER and package == "node" and kind is not Kind.WORKER:
        yield Violation(rel, imp.line, "worker",
                        f"imports worker module {imp.module} (a child process's entry point)")
    elif kind is Kind.SERVICE and target_kind is Kind.SERVICE:
        yield Violation(rel, imp.line, "service",
                        f"imports another domain's service {imp.module} (pass it to the constructor)")
    elif kind in SANS_IO and target_kind not in (SANS_IO if kind is Kind.STORE else {Kind.CORE, Kind.PURE}):
        yield Violation(rel, imp.line, "impure-import",
                        f"{kind.value} module imports {target_kind.value} module {imp.module}")


# ----------------------------------------------------------------------------- the real tree


def test_tree_is_layered() -> None:
    violations = check_tree(ROOT)
    assert not violations, "layering violations:\n" + "\n".join(map(str, violations))


def test_real_tree_is_seen() -> None:
    """The walk finds the tree and classifies it (a checker that reads nothing passes anything)."""
    files = _modules(ROOT)
    assert "protocol/connection.py" in files and "discovery/swim.py" in files
    assert kind_of("node/runtime.py") is Kind.RUNTIME and kind_of("node/core.py") is Kind.PURE
    assert kind_of("node/allreduce/round.py") is Kind.CORE
    assert kind_of("node/tasks/service.py") is Kind.SERVICE
    assert kind_of("node/tasks/deep/service.py") is Kind.CORE  # exactly one service per domain
    assert kind_of("node/blobs/store.py") is Kind.STORE
    assert kind_of("node/training/torch_worker.py") is Kind.WORKER
    assert kind_of("node/training/runner/charlm.py") is Kind.WORKER
    assert kind_of("simulations/allreduce_worker.py") is Kind.WORKER


# ------------------------------------------------------------------- each rule, on a toy tree


def _tree(tmp_path: Path, files: Mapping[str, str]) -> Path:
    """A source tree with the four packages (empty ``__init__``) plus ``files``."""
    for package in RANK:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    for rel, source in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(tmp_path).parents:
            init = tmp_path / parent / "__init__.py"
            if parent.parts and not init.exists():
                init.write_text("")
        path.write_text(textwrap.dedent(source))
    return tmp_path


BROKEN: list[tuple[str, dict[str, str], list[tuple[str, int, str]]]] = [
    ("protocol imports discovery", {"protocol/a.py": "from discovery import swim\n",
                                    "discovery/swim.py": ""},
     [("protocol/a.py", 1, "direction")]),
    ("discovery imports node in a function", {"discovery/a.py": "def f():\n    import node.runtime\n",
                                              "node/runtime.py": ""},
     [("discovery/a.py", 2, "direction")]),
    ("node imports simulations, type-only", {
        "node/runtime.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from simulations import simnet\n",
        "simulations/simnet.py": ""},
     [("node/runtime.py", 3, "direction")]),
    ("relative import upwards", {"protocol/messages/a.py": "from ...discovery import swim\n",
                                 "discovery/swim.py": ""},
     [("protocol/messages/a.py", 1, "direction")]),
    ("protocol imports asyncio", {"protocol/a.py": "import asyncio\n"},
     [("protocol/a.py", 1, "io")]),
    ("discovery imports time in a function", {"discovery/a.py": "def f():\n    import time\n"},
     [("discovery/a.py", 2, "io")]),
    ("a domain core imports concurrent.futures", {"node/tasks/lease.py": "from concurrent import futures\n"},
     [("node/tasks/lease.py", 1, "io")]),
    ("a domain core imports os", {"node/blobs/fetch.py": "import os\n"},
     [("node/blobs/fetch.py", 1, "io")]),
    ("a domain __init__ imports socket", {"node/tasks/__init__.py": "import socket\n"},
     [("node/tasks/__init__.py", 1, "io")]),
    ("a pure top-level module imports threading", {"node/config.py": "import threading\n"},
     [("node/config.py", 1, "io")]),
    ("a nested service.py is a core", {"node/tasks/sub/service.py": "import asyncio\n"},
     [("node/tasks/sub/service.py", 1, "io")]),
    ("a store imports asyncio and subprocess", {"node/blobs/store.py": "import asyncio\nimport subprocess\n"},
     [("node/blobs/store.py", 1, "io"), ("node/blobs/store.py", 2, "io")]),
    ("dynamic import of socket", {"protocol/a.py": "import importlib\nimportlib.import_module('socket')\n"},
     [("protocol/a.py", 2, "io")]),
    ("global RNG call", {"discovery/a.py": "import random\ndef f():\n    return random.random()\n"},
     [("discovery/a.py", 3, "random")]),
    ("global RNG under an alias", {"node/tasks/a.py": "import random as r\nx = r.choice([1])\n"},
     [("node/tasks/a.py", 2, "random")]),
    ("global RNG function imported", {"protocol/a.py": "from random import Random, shuffle\n"},
     [("protocol/a.py", 1, "random")]),
    ("global RNG seeded", {"node/core.py": "import random\nrandom.seed(1)\n"},
     [("node/core.py", 2, "random")]),
    ("a core imports the runtime", {"node/tasks/a.py": "from node.runtime import Node\n",
                                    "node/runtime.py": ""},
     [("node/tasks/a.py", 1, "impure-import")]),
    ("a core imports its own service", {"node/tasks/a.py": "from node.tasks import service\n",
                                        "node/tasks/service.py": ""},
     [("node/tasks/a.py", 1, "impure-import")]),
    ("a core imports its store", {"node/blobs/fetch.py": "from node.blobs.store import Store\n",
                                  "node/blobs/store.py": ""},
     [("node/blobs/fetch.py", 1, "impure-import")]),
    ("a pure module imports an I/O one", {"node/config.py": "from node import congestion\n",
                                          "node/congestion.py": "import socket\n"},
     [("node/config.py", 1, "impure-import")]),
    ("a core imports a worker", {"node/tasks/a.py": "import node.training.torch_worker\n",
                                 "node/training/torch_worker.py": ""},
     [("node/tasks/a.py", 1, "worker")]),
    ("a service imports a worker", {"node/tasks/service.py": "from node.tasks import worker\n",
                                    "node/tasks/worker.py": ""},
     [("node/tasks/service.py", 1, "worker")]),
    ("a service imports another domain's service", {
        "node/tasks/service.py": "from node.blobs.service import BlobService\n",
        "node/blobs/service.py": ""},
     [("node/tasks/service.py", 1, "service")]),
    ("torch where it is not allowed", {"node/tasks/a.py": "def f():\n    import torch\n"},
     [("node/tasks/a.py", 2, "torch")]),
    ("torch at module level in a lazy module", {"node/arrays.py": "import torch.nn\n"},
     [("node/arrays.py", 1, "torch")]),
    ("torch through importlib in protocol", {"protocol/a.py": "import importlib\n"
                                             "def f():\n    return importlib.import_module('torch')\n"},
     [("protocol/a.py", 3, "torch")]),
]


@pytest.mark.parametrize(("files", "expected"), [(f, e) for _, f, e in BROKEN],
                         ids=[name for name, _, _ in BROKEN])
def test_each_rule_is_reported(tmp_path: Path, files: dict[str, str],
                               expected: list[tuple[str, int, str]]) -> None:
    got = [(v.path, v.line, v.rule) for v in check_tree(_tree(tmp_path, files))]
    assert got == expected


def test_what_the_rules_allow(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "protocol/a.py": "import random\nimport secrets\nimport msgpack\n"
                         "def f(rng: random.Random = random.Random(1)) -> None: ...\n",
        "protocol/tensor/fastcast.py": "import importlib\n"
                                       "def f():\n    return importlib.import_module('torch')\n",
        "discovery/swim.py": "from protocol import a\nfrom random import Random\n",
        "node/core.py": "from protocol.a import f\nfrom discovery import swim\n",
        "node/config.py": "import os\nfrom pathlib import Path\n",
        "node/arrays.py": "def f():\n    import torch\n",
        "node/runtime.py": "import asyncio, random, socket\nfrom node.tasks.service import S\n"
                           "from node.blobs.service import B\nrandom.random()\n",
        "node/tasks/__init__.py": "from node.tasks.lease import Lease\n",
        "node/tasks/lease.py": "from node.core import Send\nfrom node.blobs import manifest\n"
                               "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                               "    import asyncio\n    from node.tasks.service import S\n",
        "node/tasks/service.py": "import asyncio, time, socket\nfrom node.tasks import lease\n"
                                 "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                 "    from node.blobs.service import B\n",
        "node/tasks/worker.py": "import torch, subprocess\nfrom node.tasks import lease\n",
        "node/blobs/manifest.py": "import hashlib\n",
        "node/blobs/service.py": "import asyncio\nfrom node.blobs.store import Store\n",
        "node/blobs/store.py": "import os, shutil, tempfile, time\nfrom pathlib import Path\n"
                               "from node.blobs.manifest import x\n",
        "simulations/sim.py": "import torch, random, time\nfrom node.tasks import worker\n"
                              "from node.runtime import Node\nrandom.random()\n",
    })
    assert check_tree(root) == []
