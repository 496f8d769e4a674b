"""The Starmesh node: the one asyncio layer (sockets, timers, CLI) over ``protocol`` and ``discovery``.

Run one with ``python -m node`` (see ``node/cli.py``). From code::

    from node.config import NodeConfig, parse_address
    from node.runtime import Node

    async with Node(NodeConfig(listen=parse_address("127.0.0.1:7400"))) as node:
        node.on_message(MsgType.SOME_TENSOR_MSG, handler)           # async handler(link, msg)
        await node.send(peer_id, message)                          # BULK channel by default
        await node.run_until_stopped()

Layout. ``runtime`` (``Node``) is the composition root: ``datadir`` (lock, keys, ready file),
``supervisor`` (the TaskGroup), ``pool`` + ``transport`` (links), ``membership`` (the
``discovery.Swim`` adapter), then the services, each built with a ``context.NodeContext``
and the services it depends on. ``driver`` is the one feed/drain/re-arm-one-timer loop of
every core; ``core`` the one output convention (``Send``) and ``stats()``; ``metrics`` serves
stats as Prometheus text. A domain is a sub-package (``allreduce/``): sans-I/O modules plus
exactly one ``service.py`` (its asyncio adapter), an on-disk ``store.py`` and child-process
entry points ``worker.py``; ``tests/test_layering.py`` enforces it. ``config`` is the one
configuration tree (``NodeConfig``) whose fields ``options`` turns into CLI flags and
``STARMESH_*`` variables; ``cli`` is ``python -m node``.
"""
