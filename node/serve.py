"""``python -m node``: one node as a process, until SIGINT/SIGTERM.

``run_node(config)`` runs ``Node`` on uvloop when installed (else asyncio), prints the join
banner (the library only logs it), gives the join ``--join-timeout`` seconds
(``node.joining.JoinWatch``: exit 1 with a verdict per seed when every seed refused our key
or never answered), and ends within ``node.shutdown.STOP_DEADLINE_S`` of a stop signal
whatever state the node is in. Returns the exit code: 0 after a clean leave.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys

from node.config import NodeConfig
from node.datadir import join_banner
from node.joining import JoinWatch
from node.runtime import Node
from node.shutdown import StopSignals

log = logging.getLogger("starmesh.node")


async def _serve(config: NodeConfig) -> int:
    signals: StopSignals | None = None
    try:
        async with Node(config) as node:
            signals = StopSignals(node.request_stop)
            signals.install(asyncio.get_running_loop())
            print(join_banner(config, node_id=node.node_id, address=node.address), flush=True)
            watch = JoinWatch(config, state=node.join_state, stop=node.request_stop)
            node.spawn(watch.run())  # --join-timeout
            await node.run_until_stopped()
            log.info("leaving the mesh")
    finally:
        if signals is not None:
            signals.cancel()  # stopped in time (the leave is announced): no forced exit
    watch.raise_if_failed()  # the join was given up: exit 1 with the verdict
    return 0


def run_node(config: NodeConfig) -> int:
    """Run a node until SIGINT/SIGTERM; returns the process exit code (0 after a clean leave)."""
    factory = None
    if config.use_uvloop:
        with contextlib.suppress(ImportError):
            import uvloop

            factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        code = runner.run(_serve(config))
    sys.stdout.flush()
    return code
