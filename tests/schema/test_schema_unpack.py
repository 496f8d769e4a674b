"""The one msgpack unpack (``unpack_body``) and the ``NodeMeta`` size cap (``MAX_META_BYTES``)."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import pytest

from protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from protocol.handshake import ResponderIdentity, _unpack_struct
from protocol.limits import MAX_META_BYTES
from protocol.messages.gossip import (
    Alive,
    GpuInfo,
    NodeMeta,
    encoded_meta_size,
    meta_size_bound,
)
from protocol.schema import SPLIT_HEAD_BYTES, decode_body, split_head, unpack_body
from protocol.tags import MsgType

NODE = bytes(range(32))

BAD_MSGPACK = [
    b"",
    b"\xc1",
    msgpack.packb({"t": 18, "seq": 1}) + b"\x00",
    msgpack.packb({"t": 18, "seq": msgpack.ExtType(1, b"x")}),
    msgpack.packb({1: 2}),
    b"\x91" * 5000 + b"\x00",
    b"\x92" + 2 * (b"\xdc\xff\xff" + b"\x90" * 65_535),  # more containers than the budget
]


@pytest.mark.parametrize("body", BAD_MSGPACK)
def test_every_decoder_maps_msgpack_failures_the_same_way(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as direct:
        unpack_body(body, what="thing")
    assert direct.value.code is ErrorCode.BAD_MSGPACK and len(str(direct.value)) <= 200
    with pytest.raises(RemoteProtocolError) as frame:
        decode_body(body)
    assert frame.value.code is ErrorCode.BAD_MSGPACK
    with pytest.raises(RemoteProtocolError) as sealed:
        _unpack_struct(ResponderIdentity, body)
    assert sealed.value.code is ErrorCode.BAD_MSGPACK
    assert split_head(body[:SPLIT_HEAD_BYTES], len(body)) is None


def test_unpack_names_what_it_unpacked() -> None:
    with pytest.raises(RemoteProtocolError, match=r"bad msgpack in sealed identity: \w+"):
        _unpack_struct(ResponderIdentity, b"\xc1")
    with pytest.raises(RemoteProtocolError, match=r"^bad msgpack: \w+"):
        decode_body(b"\xc1")
    with pytest.raises(RemoteProtocolError, match=r"^more than 131072 arrays and maps"):
        unpack_body(BAD_MSGPACK[-1], what="thing")  # our own hooks' verdict, as it was


def test_unpack_returns_the_value() -> None:
    assert unpack_body(msgpack.packb({"a": [1, b"x"]}, use_bin_type=True)) == {"a": [1, b"x"]}


# ------------------------------------------------------------------------ MAX_META_BYTES


def _meta_wire(**fields: Any) -> dict[str, Any]:
    return {**NodeMeta().to_wire(), **fields}


def _sized_meta(size: int) -> dict[str, Any]:
    """A NodeMeta wire map that encodes to exactly ``size`` bytes (3-byte characters in the
    GPU names, then the host name tuned byte by byte)."""
    for k in range(128, 0, -1):
        gpus = [{"name": "€" * k, "memory_bytes": 2**40} for _ in range(16)]
        for n in range(129):
            wire = _meta_wire(gpus=gpus, hostname="h" * n)
            if len(msgpack.packb(wire, use_bin_type=True)) == size:
                return wire
    raise AssertionError(f"no NodeMeta of {size} bytes")


def _from_wire(wire: dict[str, Any]) -> NodeMeta:
    meta: NodeMeta = NodeMeta.from_wire(wire)
    return meta


def test_meta_at_the_cap_is_accepted_one_byte_over_is_not() -> None:
    meta = _from_wire(_sized_meta(MAX_META_BYTES))
    assert encoded_meta_size(meta) == MAX_META_BYTES
    with pytest.raises(LocalProtocolError, match="over the 4096-byte cap") as info:
        _from_wire(_sized_meta(MAX_META_BYTES + 1))
    assert info.value.code is ErrorCode.SCHEMA_VIOLATION


def test_advertising_oversized_meta_is_a_local_error() -> None:
    gpus = tuple(GpuInfo(name="€" * 128, memory_bytes=2**40) for _ in range(16))
    with pytest.raises(LocalProtocolError, match="NodeMeta encodes to"):
        NodeMeta(hostname="h", gpus=gpus)
    small = NodeMeta(hostname="h", gpus=gpus[:4])
    with pytest.raises(LocalProtocolError):  # how the runtime adds detected GPUs
        dataclasses.replace(small, gpus=gpus)


def _alive_body(meta: dict[str, Any]) -> bytes:
    body: bytes = msgpack.packb({"t": int(MsgType.ALIVE), "incarnation": 1, "node": NODE,
                                 "address": "a:1", "meta": meta}, use_bin_type=True)
    return body


def test_oversized_meta_received_is_a_remote_error() -> None:
    ok = decode_body(_alive_body(_sized_meta(MAX_META_BYTES)))
    assert isinstance(ok, Alive)
    with pytest.raises(RemoteProtocolError) as info:
        decode_body(_alive_body(_sized_meta(MAX_META_BYTES + 1)))
    assert info.value.code is ErrorCode.SCHEMA_VIOLATION
    member = {"node": NODE, "address": "a:1", "incarnation": 1, "status": 0,
              "meta": _sized_meta(MAX_META_BYTES + 1)}
    body = msgpack.packb({"t": int(MsgType.PUSH_PULL), "members": [member]}, use_bin_type=True)
    with pytest.raises(RemoteProtocolError) as info:
        decode_body(body)
    assert info.value.code is ErrorCode.SCHEMA_VIOLATION


def test_omitted_fields_count_at_their_defaults() -> None:
    """The cap is on the full encoding: a sender cannot slip under it by omitting defaults."""
    wire = _sized_meta(MAX_META_BYTES + 1)
    sent = {k: v for k, v in wire.items() if k in ("gpus", "hostname")}
    assert len(msgpack.packb(sent, use_bin_type=True)) <= MAX_META_BYTES
    with pytest.raises(RemoteProtocolError):
        decode_body(_alive_body(sent))


@pytest.mark.parametrize("meta", [
    NodeMeta(),
    NodeMeta(protocol_version=2**16 - 1, cpus=2**16 - 1, memory_bytes=2**64 - 1, load=2**32 - 1,
             hostname="\U0001f600" * 128, torch_version="\U0001f600" * 64,
             cuda_version="\U0001f600" * 64,
             gpus=tuple(GpuInfo(name="", memory_bytes=2**64 - 1) for _ in range(16))),
    NodeMeta(hostname="x" * 128, torch_version="x" * 64, cuda_version="x" * 64,
             gpus=tuple(GpuInfo(name="x" * 128, memory_bytes=2**64 - 1) for _ in range(16))),
    NodeMeta(gpus=tuple(GpuInfo(name="\U0001f600" * 40, memory_bytes=2**64 - 1) for _ in range(15))),
])
def test_size_bound_is_an_upper_bound(meta: NodeMeta) -> None:
    assert encoded_meta_size(meta) <= meta_size_bound(meta)


def test_typical_meta_is_not_encoded_to_validate() -> None:
    gpus = tuple(GpuInfo(name="NVIDIA H100 80GB HBM3", memory_bytes=81559 * 2**20) for _ in range(16))
    meta = NodeMeta(hostname="gpu-node-17.cluster.example.org", gpus=gpus, torch_version="2.5.1+cu124",
                    cuda_version="12.4")
    assert meta_size_bound(meta) <= MAX_META_BYTES
