"""The test vectors of PROTOCOL.md (``tests/spec/vectors/*.json``), checked against the code.

The JSON files are for a foreign implementation: every value in them is what Starmesh
computes, with the intermediate bytes spelled out (hash inputs, parameter blocks), so a port
can check each step. This module recomputes every file from the code and asserts it is
unchanged, and recomputes the hashes a second way, from the spec's own words (the byte
layouts of §11.1 packed here with ``struct`` and a BLAKE2b written from RFC 7693 alone), so
the files, the spec and the code cannot drift apart silently.

Regenerate the files after an intended change of the code (then review the diff):

    .venv/bin/python tests/spec/test_spec_vectors.py --write

Files:

* ``allreduce_round_id.json``  round ids (§11.1): the README API's default key ``seq:1``
  (and ``seq:2``), an explicit key, a group of one.
* ``codec_names.json``         codec spellings -> canonical name -> layout digest (§11.1),
  for one fixed tensor size and group size, and spellings that are refused.
* ``swim_presets.json``        every ``SwimConfig`` field of every preset (§8) and the
  derived timers for several member counts N.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from discovery.broadcast import retransmit_limit
from discovery.config import PRESETS, SwimConfig
from discovery.probes import relay_timeout
from discovery.suspicion import expected_confirmations, suspicion_timeout
from node.allreduce import layout
from node.allreduce.rounds import RoundTable
from protocol.errors import ConfigError
from protocol.tensor import CodecSpec

HERE = Path(__file__).resolve().parent
_rfc = importlib.util.spec_from_file_location("starmesh_spec_rfc7693", HERE / "rfc7693.py")
assert _rfc is not None and _rfc.loader is not None
rfc7693 = importlib.util.module_from_spec(_rfc)
_rfc.loader.exec_module(rfc7693)
parameter_block = rfc7693.parameter_block
rfc7693_blake2b = rfc7693.rfc7693_blake2b

VECTORS = HERE / "vectors"
ROOT = HERE.parents[1]
PROTOCOL_MD = ROOT / "PROTOCOL.md"

ROUND_ID_FILE = VECTORS / "allreduce_round_id.json"
CODEC_FILE = VECTORS / "codec_names.json"
PRESETS_FILE = VECTORS / "swim_presets.json"

ROUND_PERSON = b"starmesh-ar-rid1"
LAYOUT_PERSON = b"starmesh-ar-lay1"


def blake2b_params(person: bytes) -> dict[str, Any]:
    p = parameter_block(16, person=person)
    return {
        "algorithm": "BLAKE2b (RFC 7693), unkeyed",
        "digest_size_nn": 16,
        "key_size_kk": 0,
        "salt_hex": bytes(16).hex(),
        "personalization_ascii": person.decode("ascii"),
        "personalization_hex": person.hex(),
        "parameter_block_words_hex": [f"{w:016x}" for w in p],
    }


# ---------------------------------------------------------------------------------------------
# round ids (§11.1)

#: The group: Ed25519 public keys of these seeds, listed in this (unsorted) order. The first
#: two are the initiator and responder identities of the session vectors of §5.8.
GROUP_SEEDS = ("33" * 32, "11" * 32, "22" * 32)


def node_id_of_seed(seed_hex: str) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed_hex)).public_key().public_bytes_raw()


def round_id_input(group_sorted: list[bytes], key: bytes) -> bytes:
    """§11.1: u32be(len(key)) || key || u16be(n) || id_0 || ... || id_{n-1}."""
    return struct.pack(">I", len(key)) + key + struct.pack(">H", len(group_sorted)) + b"".join(group_sorted)


def _round_case(name: str, seeds: tuple[str, ...], key: bytes, note: str) -> dict[str, Any]:
    given = [node_id_of_seed(s) for s in seeds]
    ordered = sorted(given)
    return {
        "name": name,
        "note": note,
        "group_seeds_hex": list(seeds),
        "group_as_given_hex": [g.hex() for g in given],
        "group_sorted_hex": [g.hex() for g in ordered],
        "key_ascii": key.decode("ascii"),
        "key_hex": key.hex(),
        "hash_input_hex": round_id_input(ordered, key).hex(),
        "round_id_hex": layout.round_id(given, key).hex(),
    }


def build_round_ids() -> dict[str, Any]:
    return {
        "about": "PROTOCOL.md §11.1: round_id = BLAKE2b-128(person = 'starmesh-ar-rid1'; "
                 "u32be(len(key)) || key || u16be(n) || node ids ascending). With no key the "
                 "reference API uses 'seq:<n>', n = 1 for the first such call on a group.",
        "blake2b": blake2b_params(ROUND_PERSON),
        "cases": [
            _round_case("default key, first call", GROUP_SEEDS, b"seq:1",
                        "what every member of the group computes for its first all_reduce(...) "
                        "on this group without key="),
            _round_case("default key, second call", GROUP_SEEDS, b"seq:2", "the next call on the same group"),
            _round_case("explicit key", GROUP_SEEDS, b"job-7/step-1200", "key='job-7/step-1200'"),
            _round_case("group of one", GROUP_SEEDS[1:2], b"seq:1", "a single member (n = 1)"),
        ],
    }


# ---------------------------------------------------------------------------------------------
# codec names and layout digests (§11.1)

LAYOUT_NUMEL = 1000
LAYOUT_GROUP = 3

#: Spellings a user may pass (``codec=...``, ``--codec``), each with its canonical name.
SPELLINGS = (
    "none", "fp32", "NONE", " none ", "chunk:1048576", "none+chunk:262144", "chunk:262144",
    "zstd", "zstd:1", "none+zstd", "fp32+zstd", "none+zstd:1", "zstd:3", "zstd:-1",
    "zstd+chunk:65536",
    "fp16", "FP16+ZSTD", "fp16 + zstd", "bf16", "bf16+zstd",
    "int8", "int8:512", "int8:256", "int8+zstd", "int8:512+zstd:1", "int8:256+zstd:3",
    "sigma8", "sigma8+zstd",
    "topk", "topk:0.01", "topk:0.010", "topk:1e-2", "topk+none", "topk+fp32+zstd",
    "topk:0.5+none", "topk:0.02+fp16+zstd", "topk:0.0001+int8", "topk:0.00005+bf16",
    "topk:1+chunk:524288",
)  # fmt: skip

#: Spellings that are refused (``ConfigError``): no canonical name, no round.
REJECTED = ("", "fp64", "none+fp16", "zstd+fp16", "fp16:1", "int8:4", "topk:0", "topk:1.5",
            "zstd:0", "chunk:0", "chunk", "topk:1", "fp16+fp16")


def layout_input(numel: int, sizes: tuple[int, ...], chunk_elements: int, name: str) -> bytes:
    """§11.1: u64be(numel) || u32be(chunk_elements) || u32be(n) || u64be(size_s) for every
    slice || UTF-8 of the canonical codec name (no length, no terminator)."""
    head = struct.pack(">QII", numel, chunk_elements, len(sizes))
    return head + b"".join(struct.pack(">Q", s) for s in sizes) + name.encode("utf-8")


def build_codec_names() -> dict[str, Any]:
    sizes = layout.slice_sizes(LAYOUT_NUMEL, [1.0] * LAYOUT_GROUP)
    cases = []
    for spelling in SPELLINGS:
        spec = CodecSpec.parse(spelling)
        cases.append({
            "spelling": spelling,
            "canonical": spec.name,
            "chunk_elements": spec.chunk_elements,
            "stages": [int(s) for s in spec.stages],
            "layout_input_hex": layout_input(LAYOUT_NUMEL, sizes, spec.chunk_elements, spec.name).hex(),
            "layout_hex": layout.layout_digest(LAYOUT_NUMEL, sizes, spec.chunk_elements, spec.name).hex(),
        })
    return {
        "about": "PROTOCOL.md §10.1, §11.1: the codec text a caller passes, its canonical name "
                 "(CodecSpec.parse(text).name), and the AR_BEGIN layout digest it gives for a "
                 "tensor of numel elements over a group of n members with equal weights. Members "
                 "whose digests differ exclude each other (MISMATCH).",
        "numel": LAYOUT_NUMEL,
        "n": LAYOUT_GROUP,
        "slice_sizes": list(sizes),
        "blake2b": blake2b_params(LAYOUT_PERSON),
        "cases": cases,
        "rejected": list(REJECTED),
    }


# ---------------------------------------------------------------------------------------------
# SWIM presets (§8)

#: Member counts (N: alive + suspect, this node included) the derived timers are given for.
SAMPLE_N = (1, 2, 3, 5, 8, 10, 32, 100, 1000)


def derived(cfg: SwimConfig, n: int) -> dict[str, Any]:
    lo = suspicion_timeout(cfg.suspicion_mult, n, cfg.probe_interval)
    return {
        "suspicion_min_s": lo,
        "suspicion_max_s": cfg.suspicion_max_timeout_mult * lo,
        "expected_confirmations_k": expected_confirmations(cfg.suspicion_mult, n),
        "retransmit_limit": retransmit_limit(cfg.retransmit_mult, n),
        "push_pull_period_s": cfg.push_pull_interval * max(1.0, n / cfg.push_pull_scale_threshold),
    }


def build_presets() -> dict[str, Any]:
    presets = {name: make() for name, make in PRESETS.items()}
    return {
        "about": "PROTOCOL.md §8 Semantics: every SwimConfig field of every preset "
                 "(discovery/config.py) and the timers derived from them for N members.",
        "presets": {name: dataclasses.asdict(cfg) for name, cfg in presets.items()},
        "derived": {
            name: {
                "nack_after_s": relay_timeout(cfg),
                "max_probe_period_s": cfg.probe_interval * cfg.awareness_max,
                "by_n": {str(n): derived(cfg, n) for n in SAMPLE_N},
            }
            for name, cfg in presets.items()
        },
    }


BUILDERS = {ROUND_ID_FILE: build_round_ids, CODEC_FILE: build_codec_names, PRESETS_FILE: build_presets}


def _load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _dump(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=True) + "\n"


# ---------------------------------------------------------------------------------------------
# the tests


@pytest.mark.parametrize("path", sorted(BUILDERS), ids=lambda p: p.name)
def test_vector_file_matches_the_code(path: Path) -> None:
    assert path.exists(), f"{path} is missing: run {Path(__file__).relative_to(ROOT)} --write"
    assert _load(path) == json.loads(_dump(BUILDERS[path]())), (
        f"{path.name} differs from what the code computes; if the change is intended, "
        f"regenerate it (--write) and update PROTOCOL.md")


@pytest.mark.parametrize("path", sorted(BUILDERS), ids=lambda p: p.name)
def test_protocol_md_references_the_vector_file(path: Path) -> None:
    assert str(path.relative_to(ROOT)) in PROTOCOL_MD.read_text(encoding="utf-8")


def test_blake2b_from_rfc7693_is_hashlibs() -> None:
    import hashlib

    for data in (b"", b"abc", bytes(range(256)) * 3):
        for person in (ROUND_PERSON, LAYOUT_PERSON):
            want = hashlib.blake2b(data, digest_size=16, person=person).digest()
            assert rfc7693_blake2b(data, nn=16, person=person) == want


def test_round_ids_from_the_spec_text() -> None:
    """Each round id: the §11.1 input (packed here), hashed by the RFC 7693 BLAKE2b."""
    vec = _load(ROUND_ID_FILE)
    assert vec["blake2b"]["parameter_block_words_hex"][0] == "0000000001010010"
    for case in vec["cases"]:
        given = [node_id_of_seed(s) for s in case["group_seeds_hex"]]
        assert [g.hex() for g in given] == case["group_as_given_hex"]
        ordered = sorted(given)
        key = case["key_hex"]
        data = round_id_input(ordered, bytes.fromhex(key))
        assert data.hex() == case["hash_input_hex"]
        assert rfc7693_blake2b(data, nn=16, person=ROUND_PERSON).hex() == case["round_id_hex"]


def test_the_session_vector_identities_are_in_the_group() -> None:
    """The group reuses the §5.8 identities, so a port that passed §5.8 has its node ids."""
    ids = {node_id_of_seed(s).hex() for s in GROUP_SEEDS}
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    assert {h for h in ids if h in text} >= {
        "d04ab232742bb4ab3a1368bd4615e4e6d0224ab71a016baf8520a332c9778737",
        "a09aa5f47a6759802ff955f8dc2d2a14a5c99d23be97f864127ff9383455a4f0",
    }


def test_default_key_is_the_per_group_call_counter() -> None:
    """``seq:<n>``: counted per group (in canonical order), only by calls without a key."""
    table: RoundTable[object] = RoundTable()
    group = layout.canonical_group(node_id_of_seed(s) for s in GROUP_SEEDS)
    other = group[:2]
    assert table.key_for(group, None) == b"seq:1"
    assert table.key_for(group, "job-7/step-1200") == b"job-7/step-1200"  # str: UTF-8, no count
    assert table.key_for(group, b"raw") == b"raw"
    assert table.key_for(other, None) == b"seq:1"  # another group counts on its own
    assert table.key_for(group, None) == b"seq:2"
    vec = _load(ROUND_ID_FILE)
    first = next(c for c in vec["cases"] if c["name"] == "default key, first call")
    assert layout.round_id(list(reversed(group)), b"seq:1").hex() == first["round_id_hex"]


def test_codec_names_from_the_spec_text() -> None:
    vec = _load(CODEC_FILE)
    sizes = tuple(vec["slice_sizes"])
    assert sum(sizes) == vec["numel"] and len(sizes) == vec["n"]
    for case in vec["cases"]:
        spec = CodecSpec.parse(case["spelling"])
        assert CodecSpec.parse(case["canonical"]) == spec  # the canonical name parses back
        assert CodecSpec.parse(case["canonical"]).name == case["canonical"]
        data = layout_input(vec["numel"], sizes, case["chunk_elements"], case["canonical"])
        assert data.hex() == case["layout_input_hex"]
        assert rfc7693_blake2b(data, nn=16, person=LAYOUT_PERSON).hex() == case["layout_hex"]
    for spelling in vec["rejected"]:
        with pytest.raises(ConfigError):
            CodecSpec.parse(spelling)


def _md_table(begin: str, end: str) -> list[list[str]]:
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    m = re.search(re.escape(begin) + r"(.*?)" + re.escape(end), text, re.S)
    assert m, f"PROTOCOL.md lacks {begin} ... {end}"
    lines = [line.strip() for line in m.group(1).splitlines() if line.strip().startswith("|")]
    assert len(lines) >= 2 and lines[1].startswith("| ---"), "a table: header, separator, rows"
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def test_protocol_md_codec_name_table_is_the_code() -> None:
    """Every spelling in the §11.1 table parses to the canonical name beside it."""
    rows = _md_table("<!-- codec-names:begin -->", "<!-- codec-names:end -->")
    assert rows
    for spellings, canonical in rows:
        want = canonical.strip("`")
        for spelling in re.findall(r"`([^`]*)`", spellings):
            assert CodecSpec.parse(spelling).name == want, (spelling, want)
        assert CodecSpec.parse(want).name == want


def test_protocol_md_preset_table_is_the_code() -> None:
    """The §8 table lists every SwimConfig field with each preset's value."""
    rows = _md_table("<!-- swim-presets:begin -->", "<!-- swim-presets:end -->")
    names = list(PRESETS)
    presets = {name: make() for name, make in PRESETS.items()}
    seen = []
    for row in rows:
        field = row[0].strip("`")
        seen.append(field)
        for name, cell in zip(names, row[1 : 1 + len(names)], strict=True):
            assert float(cell.replace(" ", "")) == getattr(presets[name], field), (field, name, cell)
    assert seen == [f.name for f in dataclasses.fields(SwimConfig)]


def test_protocol_md_derived_timer_table_is_the_code() -> None:
    """The §8 table of derived timers (suspicion min/max, k, retransmits) per preset and N."""
    rows = _md_table("<!-- swim-derived:begin -->", "<!-- swim-derived:end -->")
    presets = {name: make() for name, make in PRESETS.items()}
    assert rows
    for row in rows:
        name, n = row[0].strip("`"), int(row[1])
        d = derived(presets[name], n)
        got = [float(c) for c in row[2:7]]
        assert got == [d["suspicion_min_s"], d["suspicion_max_s"], d["expected_confirmations_k"],
                       d["retransmit_limit"], d["push_pull_period_s"]], (name, n)


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(f"usage: {sys.argv[0]} --write   (regenerates {VECTORS})")
    VECTORS.mkdir(parents=True, exist_ok=True)
    for out, build in BUILDERS.items():
        out.write_text(_dump(build()), encoding="utf-8")
        print(f"wrote {out}")
