"""Built-in task functions, allowed on every node by default (pattern ``node.tasks.builtins``).

Pure functions of one msgpack-able value, for smoke tests and benchmarks
(``python -m node submit node.tasks.builtins:double --inputs -``). There is no ``sleep``: this
is a core module, which may not import ``time`` (the layering rules); a sleeping function
belongs in a bundle.
"""

from __future__ import annotations

from typing import Any


def double(x: Any) -> Any:
    """``2 * x`` (numbers; a string or list repeats)."""
    return x * 2


def square(x: Any) -> Any:
    return x * x


def echo(x: Any) -> Any:
    """``x`` unchanged."""
    return x
