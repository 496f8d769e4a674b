"""``python -m node``: run a node (default), ``status``, ``mesh-key new``.

Every setting has a flag, a ``STARMESH_*`` environment variable and a default; a flag wins
over the variable, which wins over the default. They are generated from the config fields
(``node/options.py``: the field's docstring is its help, its default is the dataclass's);
``RUN_OVERRIDES`` holds the few flags spelled otherwise. ``--help`` on each command lists them.
Exit codes: 0 ok, 1 the operation failed (peer unreachable, refused, a join that gave up
after ``--join-timeout``), 2 bad configuration (a flag, a variable, a file, a busy port).
A first argument that is neither a flag nor a command is an error with a suggestion
(``stauts``: did you mean ``status``?), as is a mistyped flag.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import json
import logging
import sys
from collections.abc import Sequence

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
from protocol.errors import ConfigError, ErrorCode, RemoteProtocolError, StarmeshError

COMMANDS = ("run", "status", "mesh-key", "submit", "tasks", "task", "results", "cancel", "submitters", "blob", "train", "jobs")

RUN_DESCRIPTION = """\
Run a Starmesh node: gossip membership over an encrypted TCP protocol.

The first node of a mesh needs no flags: it creates its identity and a new mesh secret in
the data dir and prints the exact command other machines run to join it. A joining node
needs a copy of that secret first (--mesh-key-file; it never makes one up) and gives up
after --join-timeout seconds if no seed lets it in, saying why for each.

other commands:
  python -m node status [--connect HOST:PORT] [--json]   show the members as a node sees them
  python -m node mesh-key new PATH                       write a new mesh secret (0600)
  python -m node submit --bundle DIR MOD:FN --inputs F   run a function over inputs on the mesh
  python -m node tasks | task ID | results ID | cancel ID   follow and manage tasks
  python -m node submitters [add KEY | revoke KEY | key] who may submit work
  python -m node blob put PATH | get ID --out PATH | ls | pin ID | unpin ID | gc   the blob cache
"""


def version() -> str:
    """This installation's version, from the package metadata (``pip install .`` or ``-e .``)."""
    try:
        return importlib.metadata.version("starmesh")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown (not installed: run bash scripts/setup.sh or pip install .)"


def _suggest(word: str, choices: Sequence[str]) -> str:
    """`` (did you mean X?)`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def unknown_command(word: str) -> str:
    """The error for a first argument that is neither a flag nor a command."""
    return (f"unknown command {word!r}{_suggest(word, COMMANDS)}: the commands are "
            f"{', '.join(COMMANDS)} (run is the default: python -m node [FLAGS]); "
            "python -m node --help lists the flags")


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """``parser.parse_args`` whose error for a mistyped flag suggests the closest one."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        flags = [f for action in parser._actions for f in action.option_strings if f.startswith("--")]
        word = next((e.split("=", 1)[0] for e in extra if e.startswith("-")), extra[0])
        parser.error(f"unrecognized arguments: {' '.join(extra)}{_suggest(word, flags)}")
    return args


def _addresses(text: str, what: str) -> tuple[Address, ...]:
    parts = (part.strip() for part in text.split(","))
    return tuple(parse_address(p, what=what, default_port=DEFAULT_PORT) for p in parts if p)


def _address_or_port(text: str, what: str) -> Address:
    return parse_address(text, what=what, default_port=DEFAULT_PORT)


def _tags(text: str, what: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


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
    "tags": Override(flag="tag", repeat=True, metavar="KEY=VALUE", parse=_tags),
    "tasks.allow_modules": Override(flag="allow-module", repeat=True, metavar="PATTERN", parse=_tags),
    "links.bulk_congestion": Override(
        metavar="NAME", show=lambda name: name or "system",
        parse=lambda text, what: None if text.strip() == "system" else text.strip()),
}

#: Flag prefix of each nested config's fields (none for ``links`` and ``executors``).
RUN_PREFIXES: dict[str, str] = {"allreduce": "allreduce-", "tasks": "task-", "blobs": "blob-"}


def run_options() -> tuple[Option, ...]:
    """The ``run`` command's options: one per leaf field of ``NodeConfig``."""
    return options_of(NodeConfig(), overrides=RUN_OVERRIDES, prefixes=RUN_PREFIXES)


def build_run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m node [run]",
        description=RUN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-V", "--version", action="version", version=f"starmesh {version()}",
                   help="print the version and exit")
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


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s.%(msecs)03d %(levelname)-5s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def _run(argv: Sequence[str]) -> int:
    args = parse_args(build_run_parser(), argv)
    config = config_from_args(args)
    setup_logging(config.log_level)
    from node.serve import run_node  # the asyncio runtime only when a node runs

    return run_node(config)


_KEY_FLAGS = ("pass --mesh-key-file PATH (the file that node was started with) or --data-dir "
              "DIR (a node's data dir, whose mesh.key is used)")
STATUS_KEY_HINT = f"status needs the mesh key of the node it asks: {_KEY_FLAGS}"


def status_failure_hint(error: StarmeshError, client: ClientConfig) -> str:
    """What to try when ``status`` got no answer: another address, or another key."""
    if isinstance(error, RemoteProtocolError) and error.code is ErrorCode.AUTH_FAILED:
        return f"the node at {client.connect} refused the mesh key in {client.mesh_key_path}: {_KEY_FLAGS}"
    return (f"is a node running at {client.connect}? Pass --connect HOST:PORT of a running node "
            "(it printed its address when it started)")


def _status(argv: Sequence[str]) -> int:
    args = parse_args(build_status_parser(), argv)
    client = ClientOptions("status").resolve(args)
    import asyncio

    from node.identity import load_mesh_key
    from node.status import fetch_status, render_table, reply_to_json

    try:
        secret = load_mesh_key(client.mesh_key_path)
    except ConfigError as exc:
        raise ConfigError(f"{exc}\n{STATUS_KEY_HINT}") from None
    try:
        reply = asyncio.run(fetch_status(client.connect, mesh_secret=secret, timeout=client.timeout))
    except StarmeshError as exc:
        print(f"error: cannot get status from {client.connect}: {exc}\n"
              f"{status_failure_hint(exc, client)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(reply_to_json(reply), sort_keys=True))
    else:
        render_table(reply)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m node`` and the ``starmesh`` script; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and not args[0].startswith("-") and args[0] not in COMMANDS:
        print(f"error: {unknown_command(args[0])}", file=sys.stderr)
        return 2
    command, rest = (args[0], args[1:]) if args and args[0] in COMMANDS else ("run", args)
    try:
        if command == "status":
            return _status(rest)
        if command == "mesh-key":
            from node.submitters_cli import mesh_key_main

            return mesh_key_main(rest)
        if command == "submitters":
            from node.submitters_cli import main as submitters_main

            return submitters_main(rest)
        if command == "blob":
            from node.blobs_cli import main as blob_main

            return blob_main(rest)
        if command in ("train", "jobs"):
            from node import training_cli

            return training_cli.main(command, rest)
        if command in ("submit", "tasks", "task", "results", "cancel"):
            from node import tasks_cli

            return tasks_cli.main(command, rest)
        return _run(rest)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StarmeshError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
