"""The Starmesh node: the one asyncio layer (sockets, timers, CLI) over ``protocol`` and ``discovery``.

Run one with ``python -m node`` (see ``node/cli.py``). From code::

    from node.config import NodeConfig, parse_address
    from node.runtime import Node

    async with Node(NodeConfig(listen=parse_address("127.0.0.1:7400"))) as node:
        node.on_message(MsgType.SOME_TENSOR_MSG, handler)           # async handler(link, msg)
        await node.send(peer_id, message)                          # BULK channel by default
        await node.run_until_stopped()

Modules: ``config`` (NodeConfig, addresses), ``identity`` (key files, incarnation),
``transport`` (one TCP link around ``protocol.Connection``), ``pool`` (listener, dialer,
connection pool), ``membership`` (``discovery.Swim`` adapter), ``status`` (status server
and client), ``resources`` (what a node advertises), ``runtime`` (``Node``), ``cli``.
"""
