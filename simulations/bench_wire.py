"""``python -m simulations bench wire``: encrypted-frame throughput of two in-process Connections.

Sends ``--frames`` all-reduce ``ArPart`` messages carrying a ``--mib`` MiB uncompressed
float32 chunk from an initiator to a responder, no sockets. The receiver is fed the
stream in ``--read-kib`` pieces, like a socket read loop. Measured on one core, in this
process, side by side:

* raw AEAD: seal and open of the same body size with the chosen cipher, into preallocated
  buffers (the ceiling);
* send: ``Connection.send`` (header pack + seal straight from the payload + length prefix);
* receive: ``get_buffer`` / ``buffer_updated`` reads + ``next_event`` (deframe + open into
  the payload's own buffer + decode + validate), as ``node.transport.Link`` drives it;
* round trip: send then receive, one frame at a time (what one core does when it is both ends).

Every frame is timed on its own; the table shows the best (undisturbed) and the median
frame, because the machine may be shared. GB/s counts message payload bytes (1 GB = 1e9
bytes). The ratio column divides the raw AEAD time by the path's time: 1.0 would mean that
framing, msgpack and validation cost nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from protocol.connection import NEED_DATA, Channel, Connection, HandshakeOptions, MessageReceived
from protocol.crypto import Cipher, make_aead
from protocol.messages.tensor import ArPart
from protocol.tensor import CodecSpec, encode_chunk
from protocol.testing import ConnectionPair


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mib", type=float, default=4.0, help="payload MiB per frame (default 4)")
    parser.add_argument("--frames", type=int, default=16, help="frames per measurement (default 16)")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved measurements per path; the best is reported")
    parser.add_argument("--read-kib", type=int, default=256, help="receive feed size in KiB (default 256)")
    parser.add_argument("--cipher", choices=["aes-256-gcm", "chacha20-poly1305"], default="aes-256-gcm")
    parser.add_argument("--json", action="store_true", help="print a final JSON line")


def _deliver(conn: Connection, data: bytes | bytearray | memoryview, step: int) -> None:
    """What a socket read loop does with ``Link``: reads of at most ``step`` bytes, each into
    the buffer the connection asks to be filled (the copy stands for the kernel's)."""
    view, pos = memoryview(data).cast("B"), 0
    while pos < len(view):
        buf = conn.get_buffer(step)
        k = min(len(buf), step, len(view) - pos)
        buf[:k] = view[pos : pos + k]
        conn.buffer_updated(k)
        pos += k


def run(args: argparse.Namespace) -> int:
    cipher = Cipher.AES_256_GCM if args.cipher == "aes-256-gcm" else Cipher.CHACHA20_POLY1305
    numel = int(args.mib * (1 << 20)) // 4
    values = np.random.default_rng(0).standard_normal(numel).astype(np.float32)
    msg = ArPart(round_id=bytes(16), slice=0, chunk=0, data=encode_chunk(values, CodecSpec.parse("none")))
    payload = len(msg.data.payload)
    n, step = args.frames, args.read_kib * 1024
    opts = HandshakeOptions("127.0.0.1:1", Channel.BULK, ciphers=(cipher,))

    def pair() -> ConnectionPair:
        p = ConnectionPair(initiator_options=opts)
        p.handshake()
        return p

    def raw() -> dict[str, list[float]]:  # the crypto alone, into preallocated buffers: the ceiling
        aead, body = make_aead(cipher, bytes(32)), np.ones(payload + 64, np.uint8).tobytes()
        sealed, opened = bytearray(len(body) + 16), bytearray(len(body))
        out: dict[str, list[float]] = {"raw_seal": [], "raw_open": []}
        for k in range(n):
            nonce = k.to_bytes(12, "big")
            t0 = time.perf_counter()
            aead.encrypt_into(nonce, body, None, sealed)
            t1 = time.perf_counter()
            aead.decrypt_into(nonce, sealed, None, opened)
            out["raw_seal"].append(t1 - t0)
            out["raw_open"].append(time.perf_counter() - t1)
        return out

    def send_only() -> dict[str, list[float]]:
        p, times = pair(), []
        for _ in range(n):
            t = time.perf_counter()
            p.initiator.send(msg)
            times.append(time.perf_counter() - t)
        return {"send": times}

    def receive_only() -> dict[str, list[float]]:
        p = pair()
        frames, times, got = [p.initiator.send(msg) for _ in range(n)], [], 0
        for frame in frames:
            t = time.perf_counter()
            _deliver(p.responder, frame, step)
            while (ev := p.responder.next_event()) is not NEED_DATA:
                got += isinstance(ev, MessageReceived)
            times.append(time.perf_counter() - t)
        assert got == n, f"received {got} of {n}"
        return {"receive": times}

    def round_trip() -> dict[str, list[float]]:
        p, times, got = pair(), [], 0
        for _ in range(n):
            t = time.perf_counter()
            _deliver(p.responder, p.initiator.send(msg), step)
            while (ev := p.responder.next_event()) is not NEED_DATA:
                got += isinstance(ev, MessageReceived)
            times.append(time.perf_counter() - t)
        assert got == n
        return {"round_trip": times}

    # Per-frame times over interleaved repeats. The machine may be shared: the minimum is the
    # undisturbed cost, the median what a busy machine gives.
    samples: dict[str, list[float]] = {}
    for _ in range(args.repeat):
        for fn in (raw, send_only, receive_only, round_trip):
            for name, times in fn().items():
                samples.setdefault(name, []).extend(times)
    best = {k: min(v) for k, v in samples.items()}
    median = {k: statistics.median(v) for k, v in samples.items()}
    best["raw_round_trip"] = best["raw_seal"] + best["raw_open"]
    median["raw_round_trip"] = median["raw_seal"] + median["raw_open"]
    ceiling = {"send": "raw_seal", "receive": "raw_open", "round_trip": "raw_round_trip"}
    ratio = {k: best[v] / best[k] for k, v in ceiling.items()}
    gbps = {k: payload / v / 1e9 for k, v in best.items()}
    print(f"wire bench: {len(samples['send'])} frames x {payload / (1 << 20):.2f} MiB payload, {cipher.name}, "
          f"read {args.read_kib} KiB, one core")
    print(f"{'path':<16}{'best ms':>9}{'median ms':>11}{'best GB/s':>11}{'vs raw AEAD':>13}")
    for name in ("raw_seal", "raw_open", "raw_round_trip", "send", "receive", "round_trip"):
        r = f"{ratio[name]:.2f}" if name in ratio else ""
        print(f"{name:<16}{best[name] * 1e3:>9.2f}{median[name] * 1e3:>11.2f}{gbps[name]:>11.2f}{r:>13}")
    print("(send = pack + seal + prefix; receive = deframe + open + decode + validate; "
          "'vs raw AEAD' = raw seal / open / both over the same path, best of each)")
    if args.json:
        print(json.dumps({"bench": "wire", "cipher": cipher.name, "frame_payload_bytes": payload,
                          "frames": len(samples["send"]),
                          "best_gbps": {k: round(v, 3) for k, v in gbps.items()},
                          "median_ms": {k: round(v * 1e3, 3) for k, v in median.items()},
                          "ratio_to_raw_aead": {k: round(v, 3) for k, v in ratio.items()}}))
    return 0
