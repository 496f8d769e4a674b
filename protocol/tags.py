"""The message type table. APPEND ONLY: a tag, once shipped, keeps its number and meaning.

Numbers are grouped in ranges so that layers can grow independently:

====== ===========================================================
0-15   handshake and connection control (protocol/handshake.py)
16-31  membership gossip, SWIM (protocol/messages/gossip.py)
32-47  node control: status queries (protocol/messages/control.py)
48-79  tensors and all-reduce (protocol/messages/tensor.py)
80-103 tasks, their coordinators and bundles (protocol/messages/tasks.py)
104-111 submitter authorization (protocol/messages/submitters.py)
112-127 blobs: manifests, chunks, providers, clients (protocol/messages/blobs.py)
128-135 blobs, continued: leased copies (protocol/messages/blobs.py)
====== ===========================================================
"""

from __future__ import annotations

import enum


class MsgType(enum.IntEnum):
    # 0-15: handshake and connection control
    HANDSHAKE_INIT = 1
    HANDSHAKE_RESPONSE = 2
    HANDSHAKE_FINISH = 3
    ERROR = 4
    GOODBYE = 5

    # 16-31: SWIM membership gossip
    PING = 16
    PING_REQ = 17
    ACK = 18
    NACK = 19
    ALIVE = 20
    SUSPECT = 21
    DEAD = 22
    PUSH_PULL = 23

    # 32-47: node control
    STATUS_REQUEST = 32
    STATUS_REPLY = 33

    # 48-79: tensors and all-reduce (see protocol/messages/tensor.py)
    AR_BEGIN = 48
    AR_PART = 49
    AR_AVERAGE = 50
    AR_REPORT = 51
    AR_COMMIT = 52
    AR_FINISH = 53
    AR_CANCEL = 54
    AR_TAKEOVER = 55

    # 80-103: tasks (see protocol/messages/tasks.py)
    TASK_SUBMIT = 80
    TASK_ACCEPTED = 81
    TASK_ERROR = 82
    TASK_QUERY = 83
    TASK_QUERY_REPLY = 84
    TASK_CANCEL = 85
    TASK_CANCELLED = 86
    TASK_REPLICATE = 87
    TASK_REPLICATE_ACK = 88
    TASK_ASSIGN = 89
    TASK_HEARTBEAT = 90
    TASK_RESULT = 91
    TASK_REJECT = 92
    TASK_ABORT = 93
    TASK_ANNOUNCE = 94
    BUNDLE_GET = 95
    BUNDLE_CHUNK = 96

    # 104-111: submitter authorization (see protocol/messages/submitters.py)
    SUBMITTERS_SYNC = 104
    SUBMITTERS_ENTRIES = 105
    SUBMITTERS_UPDATE = 106
    SUBMITTERS_LIST = 107
    SUBMITTERS_REPLY = 108

    # 112-127: blobs (see protocol/messages/blobs.py)
    BLOB_WANT = 112
    BLOB_MANIFEST = 113
    BLOB_HAVE = 114
    BLOB_CHUNK_GET = 115
    BLOB_CHUNK = 116
    BLOB_PROVIDE = 117
    BLOB_FIND = 118
    BLOB_PROVIDERS = 119
    BLOB_PUT = 120
    BLOB_GET = 121
    BLOB_DATA = 122
    BLOB_LIST = 123
    BLOB_LIST_REPLY = 124
    BLOB_PIN = 125
    BLOB_GC = 126
    BLOB_REPLY = 127

    # 128-135: blobs, continued: leased copies (see protocol/messages/blobs.py)
    BLOB_LEASE = 128
    BLOB_LEASE_REPLY = 129
    BLOB_RELEASE = 130
    BLOB_REPLICATE = 131
    BLOB_REPLICAS = 132
