"""Member tags (``NodeMeta.tags``: wire, size cap, config, CLI, status JSON), the tag filter of
``wait_for_members`` and the ``min_contributors`` rule, without sockets."""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

import msgpack
import numpy as np
import pytest

from discovery.members import MemberView
from node.allreduce.events import (
    DEFAULT_MIN_CONTRIBUTORS,
    AllReduceError,
    AllReduceOutcome,
    TooFewContributors,
)
from node.allreduce.rounds import check_contributors, required_contributors
from node.cli import build_run_parser, config_from_args
from node.config import NodeConfig
from node.embedded import alive_with_tag
from node.resources import basic_meta, detect_meta
from node.status import member_report, report_to_json
from protocol.errors import ConfigError, ErrorCode, LocalProtocolError, RemoteProtocolError
from protocol.limits import MAX_META_BYTES
from protocol.messages.gossip import (
    MAX_TAG_LEN,
    MAX_TAGS,
    Alive,
    GpuInfo,
    MemberStatus,
    NodeMeta,
    encoded_meta_size,
    is_tag,
    meta_size_bound,
)
from protocol.messages.tensor import DropReason
from protocol.schema import Str, Struct, UInt, decode_body, encode_body, spec
from protocol.tags import MsgType

NODE = bytes(range(32))

# ------------------------------------------------------------------------ the wire field


@pytest.mark.parametrize("tag", ["job=resnet", "a=b", "team.ml-1=exp/7:v2@host+x", "k_=" + "v" * 61])
def test_valid_tags(tag: str) -> None:
    assert is_tag(tag) and len(tag) <= MAX_TAG_LEN
    assert NodeMeta(tags=(tag,)).tags == (tag,)


@pytest.mark.parametrize("tag", ["", "job", "=x", "job=", "job x=1", "job=a,b", "jöb=1", "k=" + "v" * 63,
                                 "a=b\n", 7])
def test_invalid_tags_cannot_be_built(tag: Any) -> None:
    assert not is_tag(tag)
    with pytest.raises(LocalProtocolError) as info:
        NodeMeta(tags=(tag,))
    assert info.value.code is ErrorCode.SCHEMA_VIOLATION


def test_at_most_max_tags() -> None:
    NodeMeta(tags=tuple(f"k{i}=v" for i in range(MAX_TAGS)))
    with pytest.raises(LocalProtocolError):
        NodeMeta(tags=tuple(f"k{i}=v" for i in range(MAX_TAGS + 1)))


def _alive(meta: dict[str, Any]) -> bytes:
    body: bytes = msgpack.packb({"t": int(MsgType.ALIVE), "incarnation": 1, "node": NODE,
                                 "address": "a:1", "meta": meta}, use_bin_type=True)
    return body


def test_tagless_meta_encodes_as_before_and_tags_round_trip() -> None:
    """An empty ``tags`` is left off the wire: peers without the field see the old bytes, and
    a meta from such a peer (no ``tags`` key) decodes with no tags."""
    plain = NodeMeta(hostname="h", cpus=2)
    assert "tags" not in plain.to_wire()
    old = {k: v for k, v in NodeMeta(hostname="h", cpus=2, tags=("a=b",)).to_wire().items() if k != "tags"}
    assert plain.to_wire() == old
    got = decode_body(_alive(old))
    assert isinstance(got, Alive) and got.meta.tags == ()
    tagged = Alive(incarnation=1, node=NODE, address="a:1", meta=NodeMeta(tags=("job=x", "rack=3")))
    back = decode_body(encode_body(tagged))
    assert back == tagged and isinstance(back, Alive) and back.meta.tags == ("job=x", "rack=3")


def test_a_peer_without_the_field_ignores_it() -> None:
    """What a decoder from before the field does with our tags: unknown keys are ignored."""

    @dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
    class OldMeta(Struct):
        protocol_version: int = spec(UInt(16), default=1)
        hostname: str = spec(Str(128), default="")

    old = OldMeta.from_wire(NodeMeta(hostname="h", tags=("job=x",)).to_wire())
    assert old == OldMeta(hostname="h")


def test_a_bad_tag_received_is_a_remote_schema_violation() -> None:
    for tags in (["job x=1"], ["a=b"] * (MAX_TAGS + 1), [b"a=b"], "a=b"):
        with pytest.raises(RemoteProtocolError) as info:
            decode_body(_alive({"tags": tags}))
        assert info.value.code is ErrorCode.SCHEMA_VIOLATION


def _max_ascii_meta(**extra: Any) -> NodeMeta:
    gpus = tuple(GpuInfo(name="x" * 128, memory_bytes=2**64 - 1) for _ in range(16))
    return NodeMeta(protocol_version=2**16 - 1, hostname="x" * 128, cpus=2**16 - 1, memory_bytes=2**64 - 1,
                    gpus=gpus, torch_version="x" * 64, cuda_version="x" * 64, load=2**32 - 1, **extra)


def test_tags_count_toward_the_meta_cap_and_the_bound_holds() -> None:
    tags = tuple(f"k{i:02d}=" + "v" * (MAX_TAG_LEN - 4) for i in range(MAX_TAGS))
    full = _max_ascii_meta(tags=tags)  # every field at its cap, ASCII: still under the cap
    assert encoded_meta_size(full) <= meta_size_bound(full)
    assert encoded_meta_size(full) <= MAX_META_BYTES
    assert encoded_meta_size(full) - encoded_meta_size(_max_ascii_meta()) > MAX_TAGS * (MAX_TAG_LEN - 1)
    for meta in (NodeMeta(tags=("a=b",)), NodeMeta(tags=tags[:1]), NodeMeta(tags=tuple(f"k{i}=" + "v" * 29
                                                                                        for i in range(16)))):
        assert encoded_meta_size(meta) <= meta_size_bound(meta)
    # non-ASCII GPU names near the cap: the tags push the meta over it
    big = tuple(GpuInfo(name="€" * 65, memory_bytes=1) for _ in range(16))
    NodeMeta(gpus=big)
    with pytest.raises(LocalProtocolError, match="over the 4096-byte cap"):
        NodeMeta(gpus=big, tags=tags)


def test_resources_carry_the_tags() -> None:
    base = basic_meta(tags=("job=x",))
    assert base.tags == ("job=x",) and basic_meta().tags == ()
    assert detect_meta(base, timeout=0.01).tags == ("job=x",)


# ------------------------------------------------------------------------ config and CLI


def test_config_tags_validated() -> None:
    assert NodeConfig(tags=("job=x", "rack=2")).tags == ("job=x", "rack=2")
    for bad in (("job",), ("job=x", "job=x"), tuple(f"k{i}=v" for i in range(MAX_TAGS + 1))):
        with pytest.raises(ConfigError):
            NodeConfig(tags=bad)
    with pytest.raises(ConfigError, match="tuple"):
        NodeConfig(tags=["job=x"])  # type: ignore[arg-type]


def _run_args(argv: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> NodeConfig:
    for name in list(os.environ):
        if name.startswith("STARMESH_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args: argparse.Namespace = build_run_parser().parse_args(argv)
    return config_from_args(args)


def test_tag_flag_repeats_and_env_is_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _run_args([], {}, monkeypatch).tags == ()
    assert _run_args(["--tag", "job=x", "--tag", "rack=2"], {}, monkeypatch).tags == ("job=x", "rack=2")
    assert _run_args([], {"STARMESH_TAG": "job=y, rack=3"}, monkeypatch).tags == ("job=y", "rack=3")
    assert _run_args(["--tag", "job=x"], {"STARMESH_TAG": "job=y"}, monkeypatch).tags == ("job=x",)
    with pytest.raises(ConfigError, match="--tag"):
        _run_args(["--tag", "job"], {}, monkeypatch)
    with pytest.raises(ConfigError, match="STARMESH_TAG"):
        _run_args([], {"STARMESH_TAG": "job:x"}, monkeypatch)


def test_status_json_shows_tags() -> None:
    view = MemberView(node_id=NODE, address="a:1", status=MemberStatus.ALIVE, incarnation=1,
                      meta=NodeMeta(tags=("job=x",)), last_heard=0.0)
    report = member_report(view, now=1.0, self_id=NODE)
    assert report_to_json(report)["tags"] == ["job=x"]
    assert report_to_json(dataclasses.replace(report, meta=NodeMeta()))["tags"] == []


# ------------------------------------------------------------------------ scoping groups


def _view(n: int, status: MemberStatus, *tags: str) -> MemberView:
    return MemberView(node_id=bytes([n]) * 32, address=f"h:{n}", status=status, incarnation=1,
                      meta=NodeMeta(tags=tags), last_heard=0.0)


def test_alive_with_tag() -> None:
    views = [_view(3, MemberStatus.ALIVE, "job=x"), _view(1, MemberStatus.ALIVE, "job=x", "rack=1"),
             _view(2, MemberStatus.ALIVE), _view(4, MemberStatus.SUSPECT, "job=x"),
             _view(5, MemberStatus.LEFT, "job=x"), _view(6, MemberStatus.ALIVE, "job=xy")]
    assert alive_with_tag(views, "job=x") == [bytes([1]) * 32, bytes([3]) * 32]
    assert alive_with_tag(views, "rack=1") == [bytes([1]) * 32]
    assert alive_with_tag(views, None) == [bytes([n]) * 32 for n in (1, 2, 3, 6)]
    assert alive_with_tag(views, "job=z") == []
    with pytest.raises(ConfigError):
        alive_with_tag(views, "job")


# ------------------------------------------------------------------------ min_contributors

A, B, C = (bytes([n]) * 32 for n in (1, 2, 3))


@pytest.mark.parametrize(("asked", "group", "need"), [
    (None, (A, B), DEFAULT_MIN_CONTRIBUTORS),
    (None, (A, B, C), 2),
    (1, (A,), 1),
    (1, (A, B), 1),
    (3, (A, B, C), 3),
])
def test_required_contributors(asked: int | None, group: tuple[bytes, ...], need: int) -> None:
    assert required_contributors(asked, group=group) == need


def test_a_group_of_one_fails_unless_asked_for() -> None:
    with pytest.raises(TooFewContributors, match="min_contributors=1") as info:
        required_contributors(None, group=(A,))
    assert isinstance(info.value, AllReduceError)
    assert info.value.required == 2 and info.value.contributors == (A,) and info.value.outcome is None
    with pytest.raises(TooFewContributors, match="2 members, min_contributors is 3"):
        required_contributors(3, group=(A, B))


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "2"])
def test_min_contributors_must_be_a_positive_int(bad: Any) -> None:
    with pytest.raises(ConfigError):
        required_contributors(bad, group=(A, B))


def _outcome(contributors: tuple[bytes, ...], dropped: dict[bytes, DropReason]) -> AllReduceOutcome:
    return AllReduceOutcome(tensor=np.zeros(2), contributors=contributors, dropped=dropped, round_id=bytes(16),
                            epoch=1, contributed=True, seconds=0.1)


def test_check_contributors() -> None:
    full = _outcome((A, B), {})
    assert check_contributors(full, required=2) is full
    alone = _outcome((A,), {B: DropReason.DIED})
    assert check_contributors(alone, required=1) is alone
    with pytest.raises(TooFewContributors, match=r"1 contributor\(s\), min_contributors is 2 \(dropped: .* DIED\)") as info:
        check_contributors(alone, required=2)
    assert info.value.outcome is alone and info.value.contributors == (A,) and info.value.required == 2
