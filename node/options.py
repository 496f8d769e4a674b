"""Command-line flags and ``STARMESH_*`` environment variables generated from config fields.

A frozen config dataclass is the one place a setting is written: its name, its type, its
default and the docstring under it. ``options_of(default)`` walks an instance's fields, and
the fields of the config dataclasses nested in it, and returns one ``Option`` per leaf:

* the flag ``--<prefix><name>`` and the variable ``STARMESH_<PREFIX><NAME>`` (``-``/``_``
  for ``_``; a nested config adds the prefix its parent gives it, none unless told);
* the help: the field's docstring, read from the class source with ``ast``, followed by
  ``[env STARMESH_...; default: ...]`` with the default taken from the instance;
* a parser picked from the annotation: ``int``, ``float``, ``bool``, ``str``, ``Path``,
  ``Address``, and ``X | None`` of those (the text ``none`` is None).

``Override`` bends one field where the command line wants another spelling (``--join`` for
``seeds``, ``--loop auto|asyncio`` for ``use_uvloop``); it never holds a default or help.

``add_options`` puts the options on an ``argparse`` parser (every flag's argparse default is
None, so "not given" is visible); ``resolve`` then builds a new instance: a flag wins over
the variable (set and not blank), which wins over the instance's default. A value that does
not parse, or that the class owning the field rejects in its ``__post_init__``, raises
``ConfigError`` naming the flag.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import itertools
import os
import textwrap
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from node.config import Address, parse_address
from protocol.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

C = TypeVar("C", bound="DataclassInstance")

ENV_PREFIX = "STARMESH_"

Parse = Callable[[str, str], object]
"""``parse(text, what)``: the value of ``text``; ``what`` names the source in errors."""

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_int(text: str, what: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ConfigError(f"{what} {text!r}: expected an integer") from None


def parse_float(text: str, what: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ConfigError(f"{what} {text!r}: expected a number") from None


def parse_bool(text: str, what: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ConfigError(f"{what} {text!r}: expected true or false")


def parse_str(text: str, what: str) -> str:
    return text.strip()


def parse_path(text: str, what: str) -> Path:
    return Path(text.strip()).expanduser()


def parse_addr(text: str, what: str) -> Address:
    return parse_address(text, what=what)


#: Parsers by annotated type (``X | None`` adds ``none`` -> None around them).
PARSERS: Mapping[type, Parse] = {
    int: parse_int, float: parse_float, bool: parse_bool, str: parse_str,
    Path: parse_path, Address: parse_addr,
}

_METAVARS: Mapping[type, str] = {
    int: "N", float: "NUM", bool: "BOOL", str: "TEXT", Path: "PATH", Address: "HOST:PORT",
}


def show(value: object) -> str:
    """How a default reads in ``--help``: ``none``, ``true``, ``~/.starmesh``, ``300.0``, ``a,b``."""
    if value is None or value == ():
        return "none"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        home = Path.home()
        return f"~/{value.relative_to(home)}" if value.is_relative_to(home) else str(value)
    return str(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class Override:
    """How one field differs on the command line; every part is optional."""

    flag: str | None = None
    """Flag name without ``--`` (default: the field name, ``_`` -> ``-``, after the prefix)."""
    env: str | None = None
    """Variable name without ``STARMESH_`` (default: from the flag)."""
    parse: Parse | None = None
    """Parser of the flag's or variable's text (default: from the annotation)."""
    show: Callable[[Any], str] | None = None
    """How the default reads in the help (default: ``show``)."""
    choices: tuple[str, ...] | None = None
    """The allowed texts (after ``fold``); argparse checks flags, ``resolve`` variables."""
    fold: Callable[[str], str] | None = None
    """Applied to the text before ``choices`` and ``parse`` (``str.upper``: case-insensitive)."""
    metavar: str | None = None
    repeat: bool = False
    """The flag may be repeated; its values and the variable are comma-separated lists,
    joined with ``,`` before ``parse``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Option:
    """One leaf field as a flag and an environment variable."""

    path: tuple[str, ...]
    """Field names from the root config: ``("links", "idle_timeout")``."""
    flag: str
    env: str
    help: str
    """The field's docstring, whitespace folded, without reST quotes."""
    shown: str
    """The default as ``--help`` shows it."""
    parse: Parse
    section: str
    """Dotted path of the nested config holding the field (``""``: the root)."""
    choices: tuple[str, ...] | None = None
    fold: Callable[[str], str] | None = None
    metavar: str | None = None
    repeat: bool = False

    @property
    def dest(self) -> str:
        return ".".join(self.path)

    def value_of(self, text: str, what: str) -> object:
        """Parse ``text`` (from ``what``: the flag, or the variable and the flag)."""
        if self.fold is not None:
            text = self.fold(text.strip())
        if self.choices is not None and text.strip() not in self.choices:
            raise ConfigError(f"{what} {text!r}: expected one of {', '.join(self.choices)}")
        return self.parse(text, what)


@functools.cache
def field_docs(cls: type) -> Mapping[str, str]:
    """``{field: docstring}`` of ``cls``: the string literal right under each annotation."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = next(node for node in tree.body if isinstance(node, ast.ClassDef)).body
    docs: dict[str, str] = {}
    for stmt, after in itertools.pairwise(body):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def help_text(doc: str) -> str:
    """A docstring as one line of help: whitespace folded, ````code```` quotes dropped."""
    return " ".join(doc.split()).replace("``", "")


def _leaf_type(hint: object) -> tuple[type | None, bool]:
    """``(T, optional)`` for an annotation ``T`` or ``T | None``; ``(None, _)`` if neither."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        base = rest[0] if len(rest) == 1 else None
        return (base if isinstance(base, type) and base in PARSERS else None), True
    return (hint if isinstance(hint, type) and hint in PARSERS else None), False


def _optional(parse: Parse) -> Parse:
    def parse_or_none(text: str, what: str) -> object:
        return None if text.strip().lower() == "none" else parse(text, what)
    return parse_or_none


def options_of(
    default: DataclassInstance,
    *,
    overrides: Mapping[str, Override] | None = None,
    prefixes: Mapping[str, str] | None = None,
) -> tuple[Option, ...]:
    """The options of every leaf field of ``default`` and of the configs nested in it.

    ``overrides`` and ``prefixes`` are keyed by dotted field path (``"links.bulk_congestion"``,
    ``"allreduce"``); a prefix is prepended to the flags of the nested config's fields
    (``"allreduce-"``). Raises ``TypeError`` for a field without a docstring or a parser, or
    two fields with one flag or variable: a bug in the config, caught by any test that
    builds the options."""
    out: list[Option] = []
    _walk(default, (), "", dict(overrides or {}), dict(prefixes or {}), out)
    for attr in ("flag", "env"):
        names = [getattr(o, attr) for o in out]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise TypeError(f"two config fields share the {attr} {', '.join(dupes)}")
    return tuple(out)


def _walk(instance: DataclassInstance, path: tuple[str, ...], prefix: str,
          overrides: dict[str, Override], prefixes: dict[str, str], out: list[Option]) -> None:
    cls = type(instance)
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(instance):
        key = (*path, f.name)
        dotted = ".".join(key)
        value = getattr(instance, f.name)
        if not docs.get(f.name):
            raise TypeError(f"{cls.__name__}.{f.name} has no docstring (its --help text)")
        over = overrides.pop(dotted, Override())
        base, optional = _leaf_type(hints[f.name])
        if over.parse is not None:
            parse = over.parse
        elif base is not None:
            parse = _optional(PARSERS[base]) if optional else PARSERS[base]
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            _walk(value, key, prefix + prefixes.pop(dotted, ""), overrides, prefixes, out)
            continue
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no parser for {hints[f.name]!r}")
        flag = over.flag or prefix + f.name.replace("_", "-")
        out.append(Option(
            path=key,
            flag=f"--{flag}",
            env=ENV_PREFIX + (over.env or flag.replace("-", "_").upper()),
            help=help_text(docs[f.name]),
            shown=(over.show or show)(value),
            parse=parse,
            section=".".join(path),
            choices=over.choices,
            fold=over.fold,
            metavar=over.metavar or (None if over.choices else _metavar(f.name, base)),
            repeat=over.repeat,
        ))
    if not path and (overrides or prefixes):
        raise TypeError(f"overrides or prefixes for no field: {sorted({*overrides, *prefixes})}")


def _metavar(name: str, base: type | None) -> str | None:
    if base is float and name.endswith("timeout"):
        return "S"
    return None if base is None else _METAVARS[base]


def add_options(parser: argparse.ArgumentParser, options: Sequence[Option], *,
                sections: Mapping[str, str] | None = None) -> None:
    """Add every option to ``parser``; those of a nested config go to a group titled with
    its path and described by ``sections[path]`` (the nested field's docstring)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for opt in options:
        target: argparse.ArgumentParser | argparse._ArgumentGroup = parser
        if opt.section:
            if opt.section not in groups:
                groups[opt.section] = parser.add_argument_group(
                    f"{opt.section} options", (sections or {}).get(opt.section))
            target = groups[opt.section]
        env = f"env {opt.env}" + (", comma separated" if opt.repeat else "")
        text = f"{opt.help} [{env}; default: {opt.shown}]".replace("%", "%%")
        extra: dict[str, Any] = {} if opt.fold is None else {"type": opt.fold}
        target.add_argument(
            opt.flag, dest=opt.dest, default=None, help=text, metavar=opt.metavar,
            choices=opt.choices, action="append" if opt.repeat else "store", **extra,
        )


def section_docs(default: DataclassInstance, *, path: tuple[str, ...] = ()) -> dict[str, str]:
    """``{dotted path: help}`` of every config nested in ``default`` (for ``add_options``)."""
    out: dict[str, str] = {}
    docs = field_docs(type(default))
    for f in dataclasses.fields(default):
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type | Address):
            key = (*path, f.name)
            out[".".join(key)] = help_text(docs.get(f.name, ""))
            out.update(section_docs(value, path=key))
    return out


def given(options: Sequence[Option], args: argparse.Namespace,
          environ: Mapping[str, str] | None = None) -> dict[Option, tuple[object, str]]:
    """``{option: (value, what)}`` of every option set by a flag, else by its variable."""
    env = os.environ if environ is None else environ
    out: dict[Option, tuple[object, str]] = {}
    for opt in options:
        raw = getattr(args, opt.dest, None)
        if raw is not None:
            text, what = (",".join(raw) if opt.repeat else raw), opt.flag
        elif env.get(opt.env, "").strip():
            text, what = env[opt.env], f"{opt.flag} (${opt.env})"
        else:
            continue
        out[opt] = (opt.value_of(text, what), what)
    return out


def resolve(default: C, options: Sequence[Option], args: argparse.Namespace,
            environ: Mapping[str, str] | None = None) -> C:
    """``default`` with every option given by a flag or a variable applied (see module doc)."""
    values = given(options, args, environ)
    try:
        return _apply(default, (), {opt.path: value for opt, (value, _) in values.items()})
    except ConfigError:
        for opt, (value, what) in values.items():  # name the flag whose value alone is refused
            try:
                _apply(default, (), {opt.path: value})
            except ConfigError as exc:
                raise ConfigError(f"{what}: {exc}") from None
        raise


def _apply(instance: C, path: tuple[str, ...], values: Mapping[tuple[str, ...], object]) -> C:
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(instance):
        key = (*path, f.name)
        if key in values:
            changes[f.name] = values[key]
        elif any(k[: len(key)] == key for k in values):
            changes[f.name] = _apply(getattr(instance, f.name), key, values)
    return dataclasses.replace(instance, **changes) if changes else instance
