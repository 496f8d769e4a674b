"""``python -m node``: run a node (default), ``status``, ``mesh-key new``.

Every setting has a flag, a ``STARMESH_*`` environment variable and a default; a flag wins
over the variable, which wins over the default. ``--help`` on each command lists them.
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
    PRESETS,
    NodeConfig,
    default_data_dir,
    env_default,
    parse_address,
)
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


def _opt(
    parser: argparse.ArgumentParser,
    flag: str,
    env: str,
    default: str | None,
    help_: str,
    shown: str | None = None,
    **kwargs: object,
) -> None:
    """Add ``flag`` whose default is ``$STARMESH_<env>`` or ``default``; the help says both."""
    shown = shown or ("none" if default is None else default)
    parser.add_argument(
        flag,
        default=env_default(env, default),
        help=f"{help_} [env STARMESH_{env}; default: {shown}]".replace("%", "%%"),
        **kwargs,  # type: ignore[arg-type]
    )


def _add_key_options(parser: argparse.ArgumentParser, *, create: bool) -> None:
    _opt(parser, "--data-dir", "DATA_DIR", "~/.starmesh",
         "directory with this node's identity key, mesh key and last incarnation", metavar="DIR")
    _opt(parser, "--mesh-key-file", "MESH_KEY_FILE", None,
         "the mesh secret file" + ("; created (0600) if it does not exist" if create else ""),
         shown="DATA_DIR/mesh.key",
         metavar="PATH")


def build_run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m node [run]",
        description=RUN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _opt(p, "--listen", "LISTEN", f"0.0.0.0:{DEFAULT_PORT}",
         "HOST:PORT to accept connections on; port 0 picks a free port", metavar="HOST:PORT")
    _opt(p, "--advertise", "ADVERTISE", None,
         "HOST:PORT peers dial to reach this node; by default the listen address, with a "
         "wildcard host replaced by this host's outward IP", metavar="HOST:PORT")
    p.add_argument(
        "--join", action="append", metavar="HOST:PORT",
        default=None,
        help="a member to join through; repeat for several seeds "
        "[env STARMESH_JOIN, comma separated; default: the live members remembered in "
        "DATA_DIR/peers from the last run, else start a new mesh]",
    )
    _add_key_options(p, create=True)
    _opt(p, "--preset", "PRESET", "lan",
         "SWIM timing preset: lan, wan, local (one host) or test (fast)", choices=PRESETS)
    _opt(p, "--log-level", "LOG_LEVEL", "INFO", "lowest log level printed to stderr",
         choices=LOG_LEVELS, type=str.upper)
    _opt(p, "--ready-file", "READY_FILE", None,
         "write JSON {address, listen, node_id, pid, ready_at} here once listening", metavar="PATH")
    _opt(p, "--handshake-timeout", "HANDSHAKE_TIMEOUT", "5.0",
         "seconds a connection may take to finish its handshake", metavar="S")
    _opt(p, "--dial-timeout", "DIAL_TIMEOUT", "2.0",
         "seconds a TCP connect may take before the peer counts as unreachable", metavar="S")
    _opt(p, "--leave-timeout", "LEAVE_TIMEOUT", "1.0",
         "seconds spent on shutdown flushing the leave announcement", metavar="S")
    _opt(p, "--max-connections", "MAX_CONNECTIONS", "512",
         "most open connections; further inbound ones are refused", metavar="N")
    _opt(p, "--max-handshaking", "MAX_HANDSHAKING", "64",
         "most inbound connections still in their handshake; further ones are refused", metavar="N")
    _opt(p, "--inbox-messages", "INBOX_MESSAGES", "64",
         "messages buffered per connection before reading it pauses (backpressure)", metavar="N")
    _opt(p, "--write-buffer-bytes", "WRITE_BUFFER_BYTES", str(8 * 1024 * 1024),
         "per-connection write buffer above which gossip is dropped and senders wait", metavar="N")
    _opt(p, "--idle-timeout", "IDLE_TIMEOUT", "300",
         "seconds without traffic after which a connection is closed (redialed when needed); "
         "0 keeps connections open", metavar="S")
    _opt(p, "--bulk-congestion", "BULK_CONGESTION", "system",
         "TCP congestion control of tensor (BULK) connections, e.g. cubic or bbr; "
         "system keeps the kernel's default", metavar="NAME")
    _opt(p, "--loop", "LOOP", "auto",
         "event loop: uvloop when installed (auto), or plain asyncio", choices=("auto", "asyncio"))
    _opt(p, "--seed", "SEED", None,
         "seed of the node's random number generator (probe order, jitter); "
         "none means from the OS", metavar="INT")
    return p


def build_status_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m node status",
        description="Show the members of the mesh as one node sees them.",
    )
    _opt(p, "--connect", "CONNECT", f"127.0.0.1:{DEFAULT_PORT}",
         "HOST:PORT of the node to ask", metavar="HOST:PORT")
    _add_key_options(p, create=False)
    p.add_argument("--json", action="store_true",
                   help='print one JSON object {"self": ..., "members": [...]} instead of a table')
    _opt(p, "--timeout", "STATUS_TIMEOUT", "3.0", "seconds to wait for the answer", metavar="S")
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


def _float(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{what} {text!r}: expected a number of seconds") from None


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{what} {text!r}: expected an integer") from None


def _path(text: str | None) -> Path | None:
    return None if text is None else Path(text).expanduser()


def _seeds(args: argparse.Namespace) -> tuple[str, ...]:
    if args.join is not None:
        raw: list[str] = [part for value in args.join for part in value.split(",")]
    else:
        raw = (env_default("JOIN", "") or "").split(",")
    return tuple(s.strip() for s in raw if s.strip())


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    """Turn parsed ``run`` arguments into a validated ``NodeConfig`` (``ConfigError`` if not)."""
    data_dir = _path(args.data_dir) or default_data_dir()
    return NodeConfig(
        listen=parse_address(args.listen, what="--listen", default_port=DEFAULT_PORT),
        advertise=None if args.advertise is None else parse_address(args.advertise, what="--advertise"),
        data_dir=data_dir,
        seeds=tuple(parse_address(s, what="--join", default_port=DEFAULT_PORT) for s in _seeds(args)),
        mesh_key_file=_path(args.mesh_key_file),
        preset=args.preset,
        log_level=args.log_level.upper(),
        ready_file=_path(args.ready_file),
        handshake_timeout=_float(args.handshake_timeout, "--handshake-timeout"),
        dial_timeout=_float(args.dial_timeout, "--dial-timeout"),
        leave_timeout=_float(args.leave_timeout, "--leave-timeout"),
        max_connections=_int(args.max_connections, "--max-connections"),
        max_handshaking=_int(args.max_handshaking, "--max-handshaking"),
        inbox_messages=_int(args.inbox_messages, "--inbox-messages"),
        write_buffer_bytes=_int(args.write_buffer_bytes, "--write-buffer-bytes"),
        idle_timeout=_float(args.idle_timeout, "--idle-timeout"),
        bulk_congestion=None if args.bulk_congestion == "system" else args.bulk_congestion,
        use_uvloop=args.loop == "auto",
        seed=None if args.seed is None else _int(args.seed, "--seed"),
    )


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
    from node.status import run_status_command

    data_dir = _path(args.data_dir) or default_data_dir()
    return run_status_command(
        connect=parse_address(args.connect, what="--connect", default_port=DEFAULT_PORT),
        mesh_key_file=_path(args.mesh_key_file) or data_dir / "mesh.key",
        as_json=args.json,
        timeout=_float(args.timeout, "--timeout"),
    )


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
