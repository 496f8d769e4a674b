"""PROTOCOL.md §14 is the code: every field of every blob message and struct, the enums, and
the wire round trip of each message (a chunk's payload as a view, unchanged)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

from protocol.messages import blobs
from protocol.messages.blobs import BlobChunk, BlobErrorCode, ChunkStatus, LeaseStatus
from protocol.schema import REGISTRY, decode_body, encode_body
from protocol.tags import MsgType

ROOT = Path(__file__).resolve().parents[2]


def _claims() -> ModuleType:
    """The table readers of ``tests/spec/test_spec_claims.py`` (tests are not a package)."""
    name = "_spec_claims_for_blobs"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "spec" / "test_spec_claims.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _section() -> str:
    text = (ROOT / "PROTOCOL.md").read_text(encoding="utf-8")
    return text[text.index("## 14. Blobs"):text.index("## 15. ")]


def test_blob_message_tables_are_the_code() -> None:
    claims = _claims()
    section = _section()
    tables = claims._message_tables(section)
    tags = [t for t in MsgType if 112 <= t <= 135]
    assert len(tags) == 21 and set(tables) == {t.name for t in tags}
    for tag in tags:
        claims._check_rows(REGISTRY[tag], tables[tag.name])
    structs = claims._struct_tables(section)
    assert set(structs) == {"BlobEntry"}
    claims._check_rows(blobs.BlobEntry, structs["BlobEntry"])
    for enum_cls in (ChunkStatus, BlobErrorCode, LeaseStatus):
        row = next(line for line in section.splitlines() if line.startswith(f"| `{enum_cls.__name__}` |"))
        assert re.findall(r"(\d+) `([A-Z_]+)`", row) == [(str(int(v)), v.name) for v in enum_cls]


def test_a_chunk_round_trips_with_its_payload_as_a_view() -> None:
    data = bytes(range(256)) * 4096
    msg = BlobChunk(req=7, blob_id=b"\x01" * 32, index=3, status=ChunkStatus.OK, data=memoryview(data).toreadonly())
    back = decode_body(encode_body(msg))
    assert isinstance(back, BlobChunk) and back.data == data and back.index == 3
