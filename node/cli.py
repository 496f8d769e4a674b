"""``python -m node``: run a node (default), ``status``, ``mesh-key new``.

Every setting has a flag, a ``STARMESH_*`` environment variable and a default; a flag wins
over the variable, which wins over the default. They are generated from the config fields
(``node/options.py``: the field's docstring is its help, its default is the dataclass's);
``RUN_OVERRIDES`` holds the few flags spelled otherwise. ``--help`` on each command lists them.
Exit codes: 0 ok, 1 the operation failed (peer unreachable, refused), 2 bad configuration.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from node.config import (
    DEFAULT_PORT,
    LOG_LEVELS,
    PRESET_NAMES,
    Address,
    ClientConfig,
    NodeConfig,
    parse_address,
)
from node.options import Option, Override, add_options, options_of, resolve, section_docs
from protocol.errors import ConfigError, StarmeshError

COMMANDS = ("run", "status", "mesh-key")

RUN_DESCRIPTION = """\
Run a Starmesh node: gossip membership over an encrypted TCP protocol.

The first node of a mesh needs no flags: it creates its identity and a new mesh secret in
the data dir and prints the exact command other machines run to join it.

other commands:
  python -m node status [--connect HOST:PORT] [--json]   show the members as a node sees them
  python -m node mesh-key new PATH                       write a new mesh secret (0600)
"""


def _addresses(text: str, what: str) -> tuple[Address, ...]:
    parts = (part.strip() for part in text.split(","))
    return tuple(parse_address(p, what=what, default_port=DEFAULT_PORT) for p in parts if p)


def _address_or_port(text: str, what: str) -> Address:
    return parse_address(text, what=what, default_port=DEFAULT_PORT)


#: Where the ``run`` command spells a ``NodeConfig`` field differently from its name and type.
#: Flags and variables otherwise follow the field names (``links.idle_timeout``:
#: ``--idle-timeout``, ``STARMESH_IDLE_TIMEOUT``), with ``RUN_PREFIXES`` for nested configs.
RUN_OVERRIDES: dict[str, Override] = {
    "listen": Override(parse=_address_or_port),
    "seeds": Override(flag="join", repeat=True, metavar="HOST:PORT", parse=_addresses),
    "data_dir": Override(metavar="DIR"),
    "mesh_key_file": Override(show=lambda path: "DATA_DIR/mesh.key" if path is None else str(path)),
    "preset": Override(choices=PRESET_NAMES),
    "log_level": Override(choices=LOG_LEVELS, fold=str.upper),
    "use_uvloop": Override(flag="loop", choices=("auto", "asyncio"),
                           parse=lambda text, what: text.strip() == "auto",
                           show=lambda on: "auto" if on else "asyncio"),
    "links.bulk_congestion": Override(
        metavar="NAME", show=lambda name: name or "system",
        parse=lambda text, what: None if text.strip() == "system" else text.strip()),
}

#: Flag prefix of each nested config's fields (none for ``links`` and ``executors``).
RUN_PREFIXES: dict[str, str] = {"allreduce": "allreduce-"}


def run_options() -> tuple[Option, ...]:
    """The ``run`` command's options: one per leaf field of ``NodeConfig``."""
    return options_of(NodeConfig(), overrides=RUN_OVERRIDES, prefixes=RUN_PREFIXES)


def build_run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m node [run]",
        description=RUN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(p, run_options(), sections=section_docs(NodeConfig()))
    return p


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    """Turn parsed ``run`` arguments (and ``STARMESH_*``) into a validated ``NodeConfig``
    (``ConfigError`` naming the flag if not)."""
    return resolve(NodeConfig(), run_options(), args)


class ClientOptions:
    """The flags every client command shares, from ``ClientConfig``: ``--connect``,
    ``--data-dir``, ``--mesh-key-file``, ``--timeout``. The variables are ``STARMESH_CONNECT``,
    ``STARMESH_DATA_DIR``, ``STARMESH_MESH_KEY_FILE`` and ``STARMESH_<COMMAND>_TIMEOUT``
    (each command waits its own time). Use::

        client = ClientOptions("status")
        client.add_to(parser)           # then the command's own flags
        config = client.resolve(parser.parse_args(argv))
    """

    def __init__(self, command: str, *, default: ClientConfig | None = None) -> None:
        self.default = default if default is not None else ClientConfig()
        env = command.upper().replace("-", "_")
        self.options = options_of(self.default, overrides={
            "connect": Override(parse=_address_or_port),
            "data_dir": Override(metavar="DIR"),
            "mesh_key_file": RUN_OVERRIDES["mesh_key_file"],
            "timeout": Override(env=f"{env}_TIMEOUT"),
        })

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        add_options(parser, self.options)

    def resolve(self, args: argparse.Namespace) -> ClientConfig:
        return resolve(self.default, self.options, args)


def build_status_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m node status",
        description="Show the members of the mesh as one node sees them.",
    )
    ClientOptions("status").add_to(p)
    p.add_argument("--json", action="store_true",
                   help='print one JSON object {"self": ..., "members": [...]} instead of a table')
    return p


def build_mesh_key_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m node mesh-key",
        description="Manage mesh secrets. Every member of a mesh holds the same secret.",
    )
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    new = sub.add_parser("new", help="write a new mesh secret to PATH (0600); PATH must not exist")
    new.add_argument("path", metavar="PATH")
    return p


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s.%(msecs)03d %(levelname)-5s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def _run(argv: Sequence[str]) -> int:
    args = build_run_parser().parse_args(argv)
    config = config_from_args(args)
    setup_logging(config.log_level)
    from node.runtime import run_node  # the asyncio runtime only when a node runs

    return run_node(config)


def _status(argv: Sequence[str]) -> int:
    args = build_status_parser().parse_args(argv)
    client = ClientOptions("status").resolve(args)
    from node.status import run_status_command

    return run_status_command(connect=client.connect, mesh_key_file=client.mesh_key_path,
                              as_json=args.json, timeout=client.timeout)


def _mesh_key(argv: Sequence[str]) -> int:
    args = build_mesh_key_parser().parse_args(argv)
    from node.identity import create_mesh_key

    path = Path(args.path).expanduser()
    create_mesh_key(path)
    print(f"wrote a new mesh secret to {path} (mode 0600); give it only to this mesh's nodes")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m node`` and the ``starmesh`` script; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    command, rest = (args[0], args[1:]) if args and args[0] in COMMANDS else ("run", args)
    try:
        if command == "status":
            return _status(rest)
        if command == "mesh-key":
            return _mesh_key(rest)
        return _run(rest)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StarmeshError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
