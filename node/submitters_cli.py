"""``python -m node submitters`` (who may submit work) and ``python -m node mesh-key``.

``submitters``                      the mesh owner, then each granted key (``--json``)
``submitters key``                  this person's public key (the key is made on first use):
                                    what they give the owner to be added
``submitters add PUBKEY [--name]``  grant PUBKEY (signed with ``--key``: the owner's key)
``submitters revoke PUBKEY``        revoke it
``mesh-key new PATH``               a new mesh key file whose owner is this person's key
``mesh-key set-owner PATH``         name this person's key (or ``--owner PUBKEY``) as the owner

Every ``submitters`` command but ``key`` asks a node (``--connect``, ``--data-dir``,
``--mesh-key-file``, ``--timeout``: ``node.cli.ClientOptions``). ``add`` and ``revoke`` read
the whole log from it, check it against the owner it names, sign the next entry with the
owner's key (``--key``, default ``node.submitters.store.default_key_path()``) and send it;
the node spreads it to every member. ``node.cli`` dispatches here (``main``, ``mesh_key_main``)
and this module imports it only inside functions, so either may be imported first. Exit codes
as ``node.cli``: 0 ok, 1 failed (no node,
refused), 2 bad usage or configuration (a flag, a key file, not the owner's key).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.client_link import ClientLink, with_client
from node.config import Address, ClientConfig
from node.identity import create_mesh_key, load_mesh_key, load_mesh_owner, set_mesh_owner
from node.submitters.keys import parse_public_key, public_key_of, public_key_to_text
from node.submitters.log import SubmitterLog, SubmitterLogError, make_entry
from node.submitters.store import (
    KEY_ENV,
    default_key_path,
    load_or_create_submitter_key,
    load_submitter_key,
)
from protocol.errors import ConfigError, StarmeshError, TransportError
from protocol.messages.submitters import (
    MAX_NAME_CHARS,
    SignedEntry,
    SubmitterAction,
    SubmittersList,
    SubmittersReply,
    SubmittersUpdate,
)
from protocol.tags import MsgType

ACTIONS = ("list", "add", "revoke", "key")

SET_OWNER_HINT = ("name an owner in the mesh key file: python -m node mesh-key set-owner "
                  "MESH_KEY_FILE (writes your submitter key's public key), copy the file to every "
                  "node again and restart them")


def _key_flag(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument("--key", metavar="PATH", type=Path, default=None,
                   help=f"{help_text} (default ${KEY_ENV}, else $XDG_CONFIG_HOME/starmesh/submitter.key, "
                        "XDG_CONFIG_HOME defaulting to ~/.config)")


def build_parser() -> argparse.ArgumentParser:
    from node.cli import ClientOptions  # node.cli imports this module: import it on use

    p = argparse.ArgumentParser(
        prog="python -m node submitters",
        description="Who may submit work to the mesh. The mesh owner (named in the mesh key "
                    "file) always may; the owner grants and revokes other submitter keys, and "
                    "every node learns the signed log. A submitter's code runs as the node's user.",
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    listing = sub.add_parser("list", help="the owner and the granted keys (the default action)")
    ClientOptions("submitters").add_to(listing)
    listing.add_argument("--json", action="store_true",
                         help='print one JSON object {"owner", "version", "submitters": [...]}')
    add = sub.add_parser("add", help="grant PUBKEY (sign with the owner's key)")
    add.add_argument("pubkey", metavar="PUBKEY",
                     help="ed25519:<base64url> (what `submitters key` prints) or 64 hex digits")
    add.add_argument("--name", default="", help=f"who it is (at most {MAX_NAME_CHARS} characters)")
    revoke = sub.add_parser("revoke", help="revoke PUBKEY (sign with the owner's key)")
    revoke.add_argument("pubkey", metavar="PUBKEY")
    for q in (add, revoke):
        ClientOptions("submitters").add_to(q)
        _key_flag(q, "the mesh owner's submitter key, which signs the change")
    key = sub.add_parser("key", help="print your submitter public key (made on first use): "
                                     "give it to the mesh owner to be added")
    _key_flag(key, "your submitter key")
    return p


def build_mesh_key_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m node mesh-key",
        description="Manage mesh key files. Every member of a mesh holds the same file: the "
                    "secret, and the owner, the key that decides who may submit work.",
    )
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    new = sub.add_parser("new", help="write a new mesh key file to PATH (0600; PATH must not "
                                     "exist) owned by your submitter key")
    new.add_argument("path", metavar="PATH")
    owner = sub.add_parser("set-owner", help="name the mesh owner in the key file at PATH "
                                             "(same secret): your submitter key, or --owner")
    owner.add_argument("path", metavar="PATH")
    for q in (new, owner):
        q.add_argument("--owner", metavar="PUBKEY", default=None,
                       help="the owner's public key (ed25519:<base64url>) instead of yours")
        _key_flag(q, "your submitter key, whose public key becomes the owner (made if missing)")
    return p


# ---- talking to a node ------------------------------------------------------------------------


async def _with_client(address: Address, secret: bytes, timeout: float, body: Any) -> Any:
    """Run ``await body(client)`` on a fresh CLIENT link (``node.client_link.with_client``)."""
    return await with_client(address, mesh_secret=secret, replies=(MsgType.SUBMITTERS_REPLY,), timeout=timeout,
                             body=body)


async def fetch_log(client: ClientLink, *, timeout: float) -> SubmitterLog:
    """The node's whole log, every page, each entry checked against the owner it names."""
    first = await _list(client, after=0, timeout=timeout)
    log = SubmitterLog(first.owner)
    reply = first
    while True:
        for entry in reply.entries:
            try:
                log.apply(entry)
            except SubmitterLogError as exc:
                raise TransportError(f"{client.address} sent a bad submitter log: {exc}") from None
        if log.version >= reply.version or not reply.entries:
            return log
        reply = await _list(client, after=log.version, timeout=timeout)


async def _list(client: ClientLink, *, after: int, timeout: float) -> SubmittersReply:
    reply = await client.request(lambda req: SubmittersList(req=req, after=after), timeout=timeout)
    assert isinstance(reply, SubmittersReply)
    if not reply.ok:
        raise TransportError(f"{client.address}: {reply.message}")
    return reply


async def _update(client: ClientLink, entry: SignedEntry, *, timeout: float) -> SubmittersReply:
    reply = await client.request(lambda req: SubmittersUpdate(req=req, entry=entry), timeout=timeout)
    assert isinstance(reply, SubmittersReply)
    return reply


# ---- the commands -----------------------------------------------------------------------------


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def log_to_json(log: SubmitterLog) -> dict[str, Any]:
    return {
        "owner": None if log.owner is None else public_key_to_text(log.owner),
        "version": log.version,
        "submitters": [{"key": public_key_to_text(s.key), "name": s.name, "granted_at": s.granted_at}
                       for s in log.submitters()],
    }


def render(log: SubmitterLog) -> str:
    if log.owner is None:
        return f"owner: none: nobody may submit work to this mesh\n{SET_OWNER_HINT}"
    lines = [f"owner: {public_key_to_text(log.owner)} (always may submit)"]
    granted = log.submitters()
    if not granted:
        lines.append("no other submitters (python -m node submitters add PUBKEY --name NAME)")
    else:
        width = max(len(s.name) for s in granted)
        lines.append(f"{'KEY':<52} {'NAME':<{max(width, 4)}} GRANTED")
        lines += [f"{public_key_to_text(s.key):<52} {s.name:<{max(width, 4)}} {_when(s.granted_at)}"
                  for s in granted]
    lines.append(f"(log version {log.version})")
    return "\n".join(lines)


def _client_secret(client: ClientConfig) -> bytes:
    try:
        return load_mesh_key(client.mesh_key_path)
    except ConfigError as exc:
        raise ConfigError(f"{exc}\nsubmitters needs the mesh key of the node it asks: pass "
                          "--mesh-key-file PATH or --data-dir DIR") from None


def _fail(client: ClientConfig, what: str, exc: StarmeshError) -> int:
    from node.cli import status_failure_hint

    print(f"error: cannot {what} at {client.connect}: {exc}\n{status_failure_hint(exc, client)}",
          file=sys.stderr)
    return 1


def _list_command(args: argparse.Namespace) -> int:
    from node.cli import ClientOptions

    client = ClientOptions("submitters").resolve(args)
    secret = _client_secret(client)

    async def body(link: ClientLink) -> SubmitterLog:
        return await fetch_log(link, timeout=client.timeout)

    try:
        log = asyncio.run(_with_client(client.connect, secret, client.timeout, body))
    except StarmeshError as exc:
        return _fail(client, "list the submitters", exc)
    print(json.dumps(log_to_json(log), sort_keys=True) if args.json else render(log))
    return 0


def _owner_key(path: Path | None) -> tuple[Path, Ed25519PrivateKey]:
    path = path.expanduser() if path is not None else default_key_path()
    if not path.exists():
        raise ConfigError(f"{path}: no submitter key there. Grants and revocations are signed "
                          "with the mesh owner's key: pass --key PATH of the owner's submitter key "
                          f"(or set ${KEY_ENV})")
    return path, load_submitter_key(path)


def _change_command(args: argparse.Namespace, action: SubmitterAction) -> int:
    from node.cli import ClientOptions

    client = ClientOptions("submitters").resolve(args)
    target = parse_public_key(args.pubkey)
    name: str = getattr(args, "name", "")
    if len(name) > MAX_NAME_CHARS:
        raise ConfigError(f"--name: at most {MAX_NAME_CHARS} characters")
    key_path, key = _owner_key(args.key)
    secret = _client_secret(client)
    verb = "grant" if action is SubmitterAction.GRANT else "revoke"

    async def body(link: ClientLink) -> str:
        log = await fetch_log(link, timeout=client.timeout)
        if log.owner is None:
            raise ConfigError(f"the node at {client.connect} has no mesh owner, so nobody can "
                              f"{verb} submitters: {SET_OWNER_HINT}")
        if public_key_of(key) != log.owner:
            raise ConfigError(
                f"{key_path}: this key ({public_key_to_text(public_key_of(key))}) is not the mesh "
                f"owner ({public_key_to_text(log.owner)}): only the owner's key can {verb} "
                "submitters; pass --key PATH of the owner's submitter key")
        shown = public_key_to_text(target)
        if target == log.owner:
            if action is SubmitterAction.REVOKE:
                raise ConfigError(f"{shown} is the mesh owner, who always may submit; the owner "
                                  "changes with python -m node mesh-key set-owner")
            return f"{shown} is the mesh owner: it always may submit"
        if action is SubmitterAction.GRANT and log.is_authorized(target):
            return f"{shown} may already submit"
        if action is SubmitterAction.REVOKE and not log.is_authorized(target):
            return f"{shown} is not a submitter; nothing to revoke"
        entry = make_entry(key, seq=log.version + 1, prev=log.head, action=action, key=target,
                           name=name,
                           now=time.time())
        reply = await _update(link, entry, timeout=client.timeout)
        if not reply.ok:
            raise TransportError(f"refused: {reply.message}")
        done = "granted" if action is SubmitterAction.GRANT else "revoked"
        return f"{done} {shown} (entry #{log.version + 1}); the node spreads it to every member"

    try:
        text = asyncio.run(_with_client(client.connect, secret, client.timeout, body))
    except ConfigError:
        raise
    except StarmeshError as exc:
        return _fail(client, f"{verb} a submitter", exc)
    print(text)
    return 0


def _key_command(args: argparse.Namespace) -> int:
    path = args.key.expanduser() if args.key is not None else default_key_path()
    created = not path.exists()
    key = load_or_create_submitter_key(path)
    if created:
        print(f"created your submitter key in {path} (mode 0600); keep it private", file=sys.stderr)
    print(public_key_to_text(public_key_of(key)))
    print("to be allowed to submit, give this public key to the mesh owner, who runs:\n"
          f"  python -m node submitters add {public_key_to_text(public_key_of(key))} --name NAME",
          file=sys.stderr)
    return 0


def main(argv: Sequence[str]) -> int:
    """``python -m node submitters ...``; returns the exit code (module docstring)."""
    args_list = list(argv)
    if not args_list or (args_list[0].startswith("-") and args_list[0] not in ("-h", "--help")):
        args_list.insert(0, "list")
    from node.cli import parse_args

    try:
        args = parse_args(build_parser(), args_list)
        if args.action == "key":
            return _key_command(args)
        if args.action == "add":
            return _change_command(args, SubmitterAction.GRANT)
        if args.action == "revoke":
            return _change_command(args, SubmitterAction.REVOKE)
        return _list_command(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StarmeshError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _owner_of(args: argparse.Namespace) -> tuple[bytes, str]:
    """(owner, how to say where it came from) for ``mesh-key new`` / ``set-owner``."""
    if args.owner is not None:
        return parse_public_key(args.owner), "--owner"
    path = args.key.expanduser() if args.key is not None else default_key_path()
    return public_key_of(load_or_create_submitter_key(path)), f"your submitter key {path}"


def mesh_key_main(argv: Sequence[str]) -> int:
    """``python -m node mesh-key new PATH`` / ``set-owner PATH``; returns the exit code."""
    from node.cli import parse_args

    try:
        args = parse_args(build_mesh_key_parser(), argv)
        path = Path(args.path).expanduser()
        owner, source = _owner_of(args)
        if args.action == "new":
            create_mesh_key(path, owner)
            print(f"wrote a new mesh key to {path} (mode 0600), owned by {public_key_to_text(owner)} "
                  f"({source}); give it only to this mesh's nodes")
            return 0
        before = load_mesh_owner(path)
        set_mesh_owner(path, owner)
        was = "no owner" if before is None else f"owner {public_key_to_text(before)}"
        print(f"{path}: owner is now {public_key_to_text(owner)} ({source}; was {was}). Copy "
              "this file to every node of the mesh and restart them: a node reads it at start")
        return 0
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StarmeshError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
