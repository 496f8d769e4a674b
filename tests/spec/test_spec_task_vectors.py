"""The task test vectors of PROTOCOL.md §12 (``tests/spec/vectors/task_*.json``,
``bundle_content_id.json``), checked against the code and recomputed from the spec's words.

Like ``test_spec_vectors.py``: each file is what Starmesh computes, with the intermediate
bytes spelled out; a test asserts the file is unchanged, and others rebuild every value a
second way, from §12's own words (msgpack maps written out key by key, ``hashlib.sha256``,
the RFC 7693 BLAKE2b of ``rfc7693.py``), so files, spec and code cannot drift apart.

Regenerate after an intended change of the code (then review the diff):

    .venv/bin/python tests/spec/test_spec_task_vectors.py --write

Files:

* ``task_submission.json``   encoded values, the inputs digest, a ``Submission``'s bytes, its
  signature and task id (§12.2), a cancel's signed bytes, and map log entries (§12.6).
* ``task_rendezvous.json``   weights of five node ids for three keys, their rendezvous order
  and chain, and ballots in order (§12.4).
* ``bundle_content_id.json`` a tiny bundle archive, its manifest and content id, the content
  ids of empty and multi-chunk data, and archives that are refused (§12.3).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import struct
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from node.bundles.manifest import (
    CHUNK_BYTES,
    BundleError,
    content_id,
    manifest_of,
    pack_files,
    unpack_files,
)
from node.placement import ballot_key, rank, weight
from protocol.messages.tasks import (
    Failure,
    Outcome,
    Resources,
    Submission,
    cancel_body,
    decode_struct,
    encode_struct,
    inputs_digest,
    pack_value,
    signed_submission,
    task_id_of,
)

HERE = Path(__file__).resolve().parent
VECTORS = HERE / "vectors"
ROOT = HERE.parents[1]
PROTOCOL_MD = ROOT / "PROTOCOL.md"
_rfc = importlib.util.spec_from_file_location("starmesh_spec_rfc7693", HERE / "rfc7693.py")
assert _rfc is not None and _rfc.loader is not None
rfc7693 = importlib.util.module_from_spec(_rfc)
_rfc.loader.exec_module(rfc7693)

SUBMISSION_FILE = VECTORS / "task_submission.json"
RENDEZVOUS_FILE = VECTORS / "task_rendezvous.json"
BUNDLE_FILE = VECTORS / "bundle_content_id.json"

#: The submitter's Ed25519 seed (the §5.8 initiator's), and the worker's (the responder's).
SUBMITTER_SEED = "11" * 32
WORKER_SEED = "22" * 32
#: Node ids of the rendezvous vectors: the Ed25519 public keys of these seeds.
NODE_SEEDS = ("11" * 32, "22" * 32, "33" * 32, "44" * 32, "55" * 32)
HRW_PERSON = b"starmesh-hrw"


def _key(seed_hex: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed_hex))


def node_id_of_seed(seed_hex: str) -> bytes:
    return _key(seed_hex).public_key().public_bytes_raw()


def _pack(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


# ---------------------------------------------------------------------------------------------
# the bundle (§12.3)

#: The tiny bundle: (path, mode, text), deliberately not in path order.
BUNDLE_FILES = (
    ("work.py", 0o644, "def double(x):\n    return 2 * x\n"),
    ("data/README", 0o644, "tiny\n"),
    ("bin/run.sh", 0o755, "#!/bin/sh\necho hi\n"),
)


def bundle_archive() -> bytes:
    return pack_files((p, m, t.encode()) for p, m, t in BUNDLE_FILES)


def multi_chunk_data() -> bytes:
    """``CHUNK + 3`` bytes, byte ``i`` = ``i mod 251``: two chunks, the last of 3 bytes."""
    return bytes(i % 251 for i in range(CHUNK_BYTES + 3))


#: Archives a receiver refuses (the canonical form only), as the Python values packed.
REFUSED_ARCHIVES: tuple[tuple[str, Any], ...] = (
    ("paths out of order", {"v": 1, "files": [["b.py", 0o644, b""], ["a.py", 0o644, b""]]}),
    ("a path twice", {"v": 1, "files": [["a.py", 0o644, b""], ["a.py", 0o644, b""]]}),
    ("a '..' component", {"v": 1, "files": [["../a.py", 0o644, b""]]}),
    ("an absolute path", {"v": 1, "files": [["/a.py", 0o644, b""]]}),
    ("mode 0o600", {"v": 1, "files": [["a.py", 0o600, b""]]}),
    ("data as str", {"v": 1, "files": [["a.py", 0o644, "x"]]}),
    ("a file that is also a directory", {"v": 1, "files": [["a", 0o644, b""], ["a/b", 0o644, b""]]}),
    ("version 2", {"v": 2, "files": []}),
    ("an extra key", {"v": 1, "files": [], "x": 0}),
)


def _manifest_case(name: str, data: bytes, *, with_data: bool) -> dict[str, Any]:
    m = manifest_of(data)
    case: dict[str, Any] = {"name": name, "size": len(data)}
    if with_data:
        case["data_hex"] = data.hex()
    case.update({
        "chunk_digests_hex": [c.hex() for c in m.chunks],
        "manifest_hex": m.encode().hex(),
        "content_id_hex": content_id(data).hex(),
    })
    return case


def build_bundle() -> dict[str, Any]:
    archive = bundle_archive()
    return {
        "about": "PROTOCOL.md §12.3: a bundle archive {'v': 1, 'files': [[path, mode, data], ...]} "
                 "sorted by path, the manifest {'v', 'size', 'chunk', 'chunks'} of its 1 MiB chunk "
                 "digests, and content_id = SHA256('starmesh manifest v1' || manifest).",
        "chunk_bytes": CHUNK_BYTES,
        "files_as_given": [{"path": p, "mode": m, "text": t} for p, m, t in BUNDLE_FILES],
        "archive": _manifest_case("the tiny bundle", archive, with_data=True),
        "other_data": [
            _manifest_case("empty data (no chunks)", b"", with_data=True),
            {**_manifest_case("1 MiB + 3 bytes, byte i = i mod 251", multi_chunk_data(), with_data=False),
             "data_formula": "bytes(i % 251 for i in range(1048579))"},
        ],
        "refused_archives": [{"name": n, "archive_hex": _pack(v).hex()} for n, v in REFUSED_ARCHIVES],
    }


# ---------------------------------------------------------------------------------------------
# the submission (§12.2, §12.6)

#: The inputs, as JSON values (what ``submit --inputs`` reads, one per line).
INPUT_VALUES: tuple[Any, ...] = (1, "two", {"x": [3, 4.5]}, None, [], -7, True)
SIGNED_AT = 1700000100.25


def submission() -> Submission:
    inputs = tuple(pack_value(v) for v in INPUT_VALUES)
    return Submission(
        function="work:double", bundle=content_id(bundle_archive()), inputs_digest=inputs_digest(inputs),
        count=len(inputs), retries=2, timeout_s=60.0, resources=Resources(cpus=0.5, gpus=0, memory_mb=512),
        submitter=node_id_of_seed(SUBMITTER_SEED), created=1700000000.5, nonce=bytes(range(16)))


def submission_wire(s: Submission) -> dict[str, Any]:
    """§12.1's table of ``Submission``, written out: every field, in order."""
    return {
        "kind": s.kind, "function": s.function, "bundle": s.bundle, "inputs_digest": s.inputs_digest,
        "count": s.count, "retries": s.retries, "timeout_s": s.timeout_s,
        "resources": {"cpus": s.resources.cpus, "gpus": s.resources.gpus, "memory_mb": s.resources.memory_mb},
        "batch": s.batch, "submitter": s.submitter, "created": s.created, "nonce": s.nonce,
    }


def log_entries() -> list[dict[str, Any]]:
    worker = node_id_of_seed(WORKER_SEED)
    ok = Outcome(index=0, ok=True, value=pack_value(2), attempts=1, worker=worker)
    failed = Outcome(index=2, ok=False, failure=Failure(type="TypeError", message="can't multiply"),
                     attempts=3, worker=worker)
    return [
        {"name": "map: subtask 0 succeeded with the value 2",
         "outcome_hex": encode_struct(ok).hex(), "entry_hex": (b"\x00" + encode_struct(ok)).hex()},
        {"name": "map: subtask 2 failed for good after 3 attempts",
         "outcome_hex": encode_struct(failed).hex(), "entry_hex": (b"\x00" + encode_struct(failed)).hex()},
        {"name": "cancel", "entry_hex": "01"},
    ]


def build_submission() -> dict[str, Any]:
    s = submission()
    inputs = [pack_value(v) for v in INPUT_VALUES]
    body = encode_struct(s)
    key = _key(SUBMITTER_SEED)
    task_id = task_id_of(body)
    wire = submission_wire(s)
    return {
        "about": "PROTOCOL.md §12.2: inputs_digest = SHA256('starmesh inputs v1' || (u64be(len) || "
                 "input)...); body = the Submission's msgpack map, every field in table order; "
                 "signature = Ed25519(submitter, 'starmesh submission v1' || body); task_id = "
                 "SHA256('starmesh task v1' || body)[:16]; cancel_body = 'starmesh cancel v1' || "
                 "task_id || f64be(signed_at). §12.6: log entries 0x00 || Outcome, 0x01 = cancel.",
        "inputs": [{"json": v, "msgpack_hex": b.hex()} for v, b in zip(INPUT_VALUES, inputs, strict=True)],
        "inputs_digest_input_hex": inputs_digest_input(inputs).hex(),
        "inputs_digest_hex": inputs_digest(inputs).hex(),
        "empty_inputs_digest_hex": inputs_digest([]).hex(),
        "bundle_file": "bundle_content_id.json (archive.content_id_hex)",
        "submitter_seed_hex": SUBMITTER_SEED,
        "submission": {k: (v.hex() if isinstance(v, bytes) else v) for k, v in wire.items()},
        "body_hex": body.hex(),
        "signed_bytes_hex": signed_submission(body).hex(),
        "signature_hex": key.sign(signed_submission(body)).hex(),
        "task_id_input_hex": (b"starmesh task v1" + body).hex(),
        "task_id_hex": task_id.hex(),
        "cancel": {
            "signed_at": SIGNED_AT,
            "cancel_body_hex": cancel_body(task_id, SIGNED_AT).hex(),
            "signature_hex": key.sign(cancel_body(task_id, SIGNED_AT)).hex(),
        },
        "log_entries": log_entries(),
    }


def inputs_digest_input(inputs: list[bytes]) -> bytes:
    """§12.2: what SHA-256 hashes for the inputs digest."""
    return b"starmesh inputs v1" + b"".join(struct.pack(">Q", len(i)) + i for i in inputs)


# ---------------------------------------------------------------------------------------------
# rendezvous (§12.4)

#: Keys: a task id (16 bytes), a 32-byte key, and a 70-byte one (only its first 64 bytes count).
RENDEZVOUS_KEYS = (
    ("a task id", bytes.fromhex("00112233445566778899aabbccddeeff")),
    ("32 bytes", bytes(range(32))),
    ("70 bytes: key[0:64] is the BLAKE2b key", bytes(range(70))),
)


def hrw_params(key: bytes) -> dict[str, Any]:
    person = HRW_PERSON.ljust(16, b"\0")
    kk = len(key[:64])
    return {
        "digest_size_nn": 8,
        "key_size_kk": kk,
        "personalization_hex": person.hex(),
        "parameter_block_words_hex": [f"{w:016x}" for w in rfc7693.parameter_block(8, person=person, kk=kk)],
    }


def build_rendezvous() -> dict[str, Any]:
    nodes = [node_id_of_seed(s) for s in NODE_SEEDS]
    cases = []
    for name, key in RENDEZVOUS_KEYS:
        order = rank(key, nodes)
        cases.append({
            "name": name,
            "key_hex": key.hex(),
            "blake2b": hrw_params(key),
            "weights": [{"node_hex": n.hex(), "digest_hex": weight(key, n).to_bytes(8, "big").hex(),
                         "weight": str(weight(key, n))} for n in nodes],
            "rank_hex": [n.hex() for n in order],
            "chain": {"coordinator_hex": order[0].hex(), "replicas_r2_hex": [n.hex() for n in order[1:3]]},
        })
    key = RENDEZVOUS_KEYS[0][1]
    order = rank(key, nodes)
    ballots = [(0, order[4]), (2, order[4]), (1, order[0]), (0, order[0]), (1, order[3]), (1, order[1])]
    ascending = sorted(ballots, key=lambda b: ballot_key(key, b[0], b[1]))
    return {
        "about": "PROTOCOL.md §12.4: weight = u64be(BLAKE2b(node_id, digest 8, key = key[0:64], "
                 "personalization 'starmesh-hrw' zero-padded to 16)); rank = by (weight, node id) "
                 "descending; chain[0] coordinates, the next r = 2 replicate; ballots order by "
                 "(epoch, weight(task_id, node), node), higher wins.",
        "node_seeds_hex": list(NODE_SEEDS),
        "cases": cases,
        "ballots": {
            "key_hex": key.hex(),
            "given": [{"epoch": e, "node_hex": n.hex()} for e, n in ballots],
            "ascending": [{"epoch": e, "node_hex": n.hex()} for e, n in ascending],
        },
    }


BUILDERS = {SUBMISSION_FILE: build_submission, RENDEZVOUS_FILE: build_rendezvous, BUNDLE_FILE: build_bundle}


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


def test_submission_from_the_spec_text() -> None:
    vec = _load(SUBMISSION_FILE)
    inputs = []
    for item in vec["inputs"]:
        packed = _pack(item["json"])
        assert packed.hex() == item["msgpack_hex"]
        inputs.append(packed)
    data = b"starmesh inputs v1" + b"".join(struct.pack(">Q", len(i)) + i for i in inputs)
    assert data.hex() == vec["inputs_digest_input_hex"]
    assert hashlib.sha256(data).hexdigest() == vec["inputs_digest_hex"]
    assert hashlib.sha256(b"starmesh inputs v1").hexdigest() == vec["empty_inputs_digest_hex"]
    s = vec["submission"]
    assert s["bundle"] == _load(BUNDLE_FILE)["archive"]["content_id_hex"]
    assert s["inputs_digest"] == vec["inputs_digest_hex"]
    wire = {k: (bytes.fromhex(s[k]) if k in ("bundle", "inputs_digest", "submitter", "nonce") else s[k])
            for k in ("kind", "function", "bundle", "inputs_digest", "count", "retries", "timeout_s",
                      "resources", "batch", "submitter", "created", "nonce")}
    body = _pack(wire)
    assert body.hex() == vec["body_hex"]
    signed = b"starmesh submission v1" + body
    assert signed.hex() == vec["signed_bytes_hex"]
    public = Ed25519PublicKey.from_public_bytes(wire["submitter"])
    public.verify(bytes.fromhex(vec["signature_hex"]), signed)  # raises if not
    assert wire["submitter"] == node_id_of_seed(vec["submitter_seed_hex"])
    task_id = hashlib.sha256(b"starmesh task v1" + body).digest()[:16]
    assert task_id.hex() == vec["task_id_hex"]
    cancel = vec["cancel"]
    data = b"starmesh cancel v1" + task_id + struct.pack(">d", cancel["signed_at"])
    assert data.hex() == cancel["cancel_body_hex"]
    public.verify(bytes.fromhex(cancel["signature_hex"]), data)


def test_submission_decodes_in_any_key_order() -> None:
    """§12.2: receivers accept any key order; the id is over the bytes as sent."""
    vec = _load(SUBMISSION_FILE)
    body = bytes.fromhex(vec["body_hex"])
    raw = msgpack.unpackb(body, raw=False)
    shuffled = _pack(dict(reversed(list(raw.items()))))
    assert shuffled != body
    assert decode_struct(Submission, shuffled, what="submission") == decode_struct(Submission, body, what="s")
    assert task_id_of(shuffled) != task_id_of(body)


def test_log_entries_from_the_spec_text() -> None:
    vec = _load(SUBMISSION_FILE)
    worker = node_id_of_seed(WORKER_SEED)
    ok, failed, cancel = vec["log_entries"]
    want_ok = {"index": 0, "ok": True, "value": _pack(2), "failure": None, "attempts": 1, "worker": worker}
    assert _pack(want_ok).hex() == ok["outcome_hex"] and ok["entry_hex"] == "00" + ok["outcome_hex"]
    failure = {"type": "TypeError", "message": "can't multiply", "traceback": "", "stdout": "", "stderr": ""}
    want_failed = {"index": 2, "ok": False, "value": b"", "failure": failure, "attempts": 3, "worker": worker}
    assert _pack(want_failed).hex() == failed["outcome_hex"]
    assert failed["entry_hex"] == "00" + failed["outcome_hex"]
    assert cancel["entry_hex"] == "01"


def test_rendezvous_from_the_spec_text() -> None:
    vec = _load(RENDEZVOUS_FILE)
    nodes = [node_id_of_seed(s) for s in vec["node_seeds_hex"]]
    person = HRW_PERSON.ljust(16, b"\0")
    for case in vec["cases"]:
        key = bytes.fromhex(case["key_hex"])
        weights = {}
        for node, w in zip(nodes, case["weights"], strict=True):
            assert node.hex() == w["node_hex"]
            digest = rfc7693.rfc7693_blake2b(node, nn=8, person=person, key=key[:64])
            assert digest.hex() == w["digest_hex"] and int.from_bytes(digest, "big") == int(w["weight"])
            weights[node] = int(w["weight"])
        order = sorted(nodes, key=lambda n: (weights[n], n), reverse=True)
        assert [n.hex() for n in order] == case["rank_hex"]
        assert case["chain"]["coordinator_hex"] == case["rank_hex"][0]
        assert case["chain"]["replicas_r2_hex"] == case["rank_hex"][1:3]
    b = vec["ballots"]
    key = bytes.fromhex(b["key_hex"])

    def order_of(x: dict[str, Any]) -> tuple[int, int, bytes]:
        node = bytes.fromhex(x["node_hex"])
        w = rfc7693.rfc7693_blake2b(node, nn=8, person=person, key=key[:64])
        return (x["epoch"], int.from_bytes(w, "big"), node)

    assert sorted(b["given"], key=order_of) == b["ascending"]


def test_blake2b_keyed_from_rfc7693_is_hashlibs() -> None:
    for key in (b"k", bytes(range(16)), bytes(range(64))):
        for data in (b"", b"abc", bytes(range(200))):
            want = hashlib.blake2b(data, digest_size=8, key=key, person=HRW_PERSON).digest()
            assert rfc7693.rfc7693_blake2b(data, nn=8, person=HRW_PERSON.ljust(16, b"\0"), key=key) == want


def _manifest_from_words(data: bytes) -> bytes:
    chunks = [hashlib.sha256(data[i:i + CHUNK_BYTES]).digest() for i in range(0, len(data), CHUNK_BYTES)]
    return _pack({"v": 1, "size": len(data), "chunk": 1048576, "chunks": chunks})


def test_bundle_from_the_spec_text() -> None:
    vec = _load(BUNDLE_FILE)
    files = sorted(([f["path"], f["mode"], f["text"].encode()] for f in vec["files_as_given"]),
                   key=lambda f: f[0])
    archive = _pack({"v": 1, "files": files})
    case = vec["archive"]
    assert archive.hex() == case["data_hex"]
    manifest = _manifest_from_words(archive)
    assert manifest.hex() == case["manifest_hex"]
    assert hashlib.sha256(b"starmesh manifest v1" + manifest).hexdigest() == case["content_id_hex"]
    empty, multi = vec["other_data"]
    for c, data in ((empty, bytes.fromhex(empty["data_hex"])), (multi, bytes(i % 251 for i in range(1048579)))):
        manifest = _manifest_from_words(data)
        assert manifest.hex() == c["manifest_hex"] and len(data) == c["size"]
        assert hashlib.sha256(b"starmesh manifest v1" + manifest).hexdigest() == c["content_id_hex"]
    assert len(multi["chunk_digests_hex"]) == 2 and empty["chunk_digests_hex"] == []


def test_refused_archives_are_refused() -> None:
    assert unpack_files(bytes.fromhex(_load(BUNDLE_FILE)["archive"]["data_hex"]))
    for case in _load(BUNDLE_FILE)["refused_archives"]:
        with pytest.raises(BundleError):
            unpack_files(bytes.fromhex(case["archive_hex"]))


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(f"usage: {sys.argv[0]} --write   (regenerates the task vectors in {VECTORS})")
    VECTORS.mkdir(parents=True, exist_ok=True)
    for out, build in BUILDERS.items():
        out.write_text(_dump(build()), encoding="utf-8")
        print(f"wrote {out}")
