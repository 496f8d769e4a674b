"""Hard caps on everything a peer can make us buffer or parse (PROTOCOL.md §Limits).

Every length, count and size that comes off the wire is bounded by a constant here or by a
field's own ``Spec``. Exceeding one is a ``RemoteProtocolError``; nothing grows without bound.
"""

from __future__ import annotations

#: Largest frame body (after the 4-byte length prefix), ciphertext included. Tensor chunks are
#: at most ``MAX_TENSOR_CHUNK_BYTES`` of payload, so a frame of this size always fits one.
MAX_FRAME_BYTES = 8 * 1024 * 1024

#: Largest frame body accepted before the handshake completes (handshake messages are small).
MAX_HANDSHAKE_FRAME_BYTES = 4 * 1024

#: Largest encoded payload of one tensor chunk on the wire.
MAX_TENSOR_CHUNK_BYTES = 6 * 1024 * 1024

#: Largest size a tensor chunk may declare it decompresses to (zstd-bomb guard).
MAX_DECOMPRESSED_CHUNK_BYTES = 64 * 1024 * 1024

#: Longest msgpack array / map anywhere in a message.
MAX_LIST_LEN = 65_536
MAX_MAP_LEN = 256

#: Most msgpack arrays + maps in one message body. An empty container is one byte on the wire
#: but ~60 bytes in memory: without this cap an 8 MiB frame could cost ~0.5 GB to unpack. The
#: largest legitimate body (a 4096-member sync, 16 GPUs each) has ~78k containers.
MAX_CONTAINERS = 131_072

#: Default longest string field, in characters.
MAX_STR_BYTES = 1024

#: Most members carried in one push/pull state sync (larger meshes sync in several messages).
MAX_MEMBERS_PER_SYNC = 4096

#: Largest encoded member metadata (resources, versions, load): ``NodeMeta`` encoded with every
#: field present (``protocol.messages.gossip.encoded_meta_size``), checked when one is built, so
#: a received one over it is a ``RemoteProtocolError`` and ours a ``LocalProtocolError``.
MAX_META_BYTES = 4096

#: Longest "host:port" address string.
MAX_ADDRESS_LEN = 262

#: Node ids are raw Ed25519 public keys.
NODE_ID_BYTES = 32
