"""Tasks: work submitted to the mesh, a coordinator per task, workers that run it.

``engine`` is the node's sans-I/O task core (holder, worker, directory), ``coordinator`` one
task as its coordinator or a replica holds it, ``mapkind`` the map kind's subtasks, ``service``
the node's asyncio adapter, ``task_worker`` the child process that runs subtasks. Kept empty
of imports: the worker child imports ``node.tasks.*`` and must start fast.
"""
