"""``python tests/submitters/submitters_node.py [run flags]``: a node process with the submitter
service, composed here while ``node.runtime.Node`` does not build one itself (then it only
runs the node). Same flags as ``python -m node``; SIGTERM/SIGINT stop it."""

from __future__ import annotations

import asyncio
import sys

from node.cli import build_run_parser, config_from_args, parse_args, setup_logging
from node.config import NodeConfig
from node.identity import load_mesh_owner
from node.runtime import Node
from node.shutdown import StopSignals
from node.submitters.service import SubmitterService


async def serve(config: NodeConfig) -> int:
    async with Node(config) as node:
        if not any(service.name == "submitters" for service in node.services):
            assert node._ctx is not None
            # No await before the handlers are in: nothing is read off a socket until then.
            await node._add_service(SubmitterService(node._ctx, owner=load_mesh_owner(config.mesh_key_path)))
        signals = StopSignals(node.request_stop)
        signals.install(asyncio.get_running_loop())
        await node.run_until_stopped()
        signals.cancel()
    return 0


def main() -> int:
    config = config_from_args(parse_args(build_run_parser(), sys.argv[1:]))
    setup_logging(config.log_level)
    return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
