"""Training jobs: a task kind whose workers train one model data-parallel (see ``trainkind``).

Cores here are sans-I/O (the job's group and shard bookkeeping, its configuration);
``service.py`` runs each job's torch worker process and bridges it to the all-reduce and the
blob cache; ``runner/`` is the torch side, imported only in that worker process.
"""
