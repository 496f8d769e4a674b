"""The torch side of a training job: runs only in a job's worker process, never in a node.

``job`` is the interface a user's bundle implements (``Job``); ``data`` ships tiny Shakespeare
and cuts a text into seeded (shard, position) windows; ``charlm`` is the built-in
character-level GPT on it; ``state`` saves and loads the shared training state as safetensors;
``diloco`` is the outer optimizer; ``export`` prunes, quantizes and reports on the exported
model; ``reference`` trains the same job in one process, for comparison.
"""
