"""``SubmitterLog``: owner signatures, strict ordering, the hash chain, revocation, paging."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from node.submitters.log import (
    MAX_LOG_ENTRIES,
    BadEntry,
    BadSignature,
    ForkedEntry,
    LogFull,
    NoOwner,
    Submitter,
    SubmitterLog,
    make_entry,
    sign_payload,
)
from protocol import crypto
from protocol.messages.submitters import (
    NO_PREV,
    SignedEntry,
    SubmitterAction,
    SubmitterEntry,
    SubmittersEntries,
    decode_entry,
    encode_entry,
    entry_digest,
)
from protocol.schema import decode_body, encode_body

OWNER = crypto.identity_from_bytes(bytes([1]) * 32)
OWNER_PUB = crypto.node_id_of(OWNER)
ALICE = crypto.node_id_of(crypto.identity_from_bytes(bytes([2]) * 32))
BOB = crypto.node_id_of(crypto.identity_from_bytes(bytes([3]) * 32))
GRANT, REVOKE = SubmitterAction.GRANT, SubmitterAction.REVOKE


def _chain(*changes: tuple[SubmitterAction, bytes, str], signer: object = OWNER) -> list[SignedEntry]:
    """Entries 1..n, each on top of the one before, signed at now = 100 + seq."""
    out, prev = [], NO_PREV
    for seq, (action, key, name) in enumerate(changes, 1):
        entry = make_entry(signer, seq=seq, prev=prev, action=action, key=key, name=name,  # type: ignore[arg-type]
                           now=100.0 + seq)
        out.append(entry)
        prev = entry_digest(entry.body)
    return out


def _log(*entries: SignedEntry) -> SubmitterLog:
    log = SubmitterLog(OWNER_PUB)
    for e in entries:
        assert log.apply(e)
    return log


def test_the_owner_is_always_authorized_and_nobody_else_at_first() -> None:
    log = SubmitterLog(OWNER_PUB)
    assert log.version == 0 and log.head == NO_PREV
    assert log.is_authorized(OWNER_PUB) and not log.is_authorized(ALICE)
    assert log.submitters() == [] and log.entries_after(0, 10) == []


def test_grant_then_revoke_then_grant_again() -> None:
    entries = _chain((GRANT, ALICE, "alice"), (GRANT, BOB, "bob"), (REVOKE, ALICE, ""))
    log = SubmitterLog(OWNER_PUB)
    assert log.apply(entries[0]) and log.is_authorized(ALICE)
    assert log.submitters() == [Submitter(ALICE, "alice", 101.0)]
    assert log.apply(entries[1]) and log.apply(entries[2])
    assert not log.is_authorized(ALICE) and log.is_authorized(BOB)
    assert log.submitters() == [Submitter(BOB, "bob", 102.0)]
    again = make_entry(OWNER, seq=4, prev=log.head, action=GRANT, key=ALICE, name="alice2", now=200.0)
    assert log.apply(again) and log.is_authorized(ALICE)
    assert [s.key for s in log.submitters()] == [BOB, ALICE]  # the order of the latest grants
    assert log.stats() == {"submitters_log_version": 4.0, "submitters_granted": 2.0,
                           "submitters_forks_total": 0.0}


def test_revoking_the_owner_changes_nothing() -> None:
    log = _log(*_chain((REVOKE, OWNER_PUB, "")))
    assert log.is_authorized(OWNER_PUB)


def test_only_the_next_entry_is_taken_duplicates_are_ignored() -> None:
    e1, e2, e3 = _chain((GRANT, ALICE, ""), (GRANT, BOB, ""), (REVOKE, BOB, ""))
    log = SubmitterLog(OWNER_PUB)
    assert not log.apply(e2) and log.version == 0  # a gap: wait for entry 1
    assert log.apply(e1) and not log.apply(e1)  # a duplicate is no change
    assert not log.apply(e3) and log.apply(e2) and log.apply(e3) and log.version == 3
    assert not log.apply(e1) and log.version == 3


def test_an_entry_signed_by_another_key_is_refused() -> None:
    (forged,) = _chain((GRANT, ALICE, ""), signer=crypto.identity_from_bytes(bytes([9]) * 32))
    log = SubmitterLog(OWNER_PUB)
    with pytest.raises(BadSignature, match="not signed by the mesh owner ed25519:"):
        log.apply(forged)
    assert log.version == 0 and not log.is_authorized(ALICE)


@pytest.mark.parametrize("field", ["key", "action", "name", "signed_at", "seq", "prev"])
def test_a_tampered_entry_is_refused(field: str) -> None:
    (entry,) = _chain((GRANT, ALICE, "alice"))
    body = decode_entry(entry.body)
    changed: Any = {"key": BOB, "action": REVOKE, "name": "mallory", "signed_at": 5.0, "seq": 2,
               "prev": bytes([7]) * 32}[field]
    tampered = dataclasses.replace(entry, body=encode_entry(dataclasses.replace(body, **{field: changed})))
    with pytest.raises(BadSignature):
        SubmitterLog(OWNER_PUB).apply(tampered)
    flipped = dataclasses.replace(entry, signature=bytes([entry.signature[0] ^ 1]) + entry.signature[1:])
    with pytest.raises(BadSignature):
        SubmitterLog(OWNER_PUB).apply(flipped)


def test_a_signed_body_that_is_not_an_entry_is_refused() -> None:
    for body in (b"\xc1", encode_entry(SubmitterEntry(seq=0, prev=NO_PREV, action=GRANT, key=ALICE, signed_at=1.0))):
        entry = SignedEntry(body=body, signature=OWNER.sign(sign_payload(body)))
        with pytest.raises(BadEntry):
            SubmitterLog(OWNER_PUB).apply(entry)


def test_two_entries_with_one_number_are_a_fork() -> None:
    (mine,) = _chain((GRANT, ALICE, ""))
    (theirs,) = _chain((GRANT, BOB, ""))
    log = _log(mine)
    with pytest.raises(ForkedEntry, match="two different entries #1"):
        log.apply(theirs)
    on_theirs = make_entry(OWNER, seq=2, prev=entry_digest(theirs.body), action=GRANT, key=BOB, now=3.0)
    with pytest.raises(ForkedEntry, match="on top of another entry"):
        log.apply(on_theirs)
    assert log.version == 1 and log.forks == 2 and not log.is_authorized(BOB)


def test_without_an_owner_nothing_applies_and_nobody_is_authorized() -> None:
    log = SubmitterLog(None)
    assert not log.is_authorized(OWNER_PUB)
    with pytest.raises(NoOwner, match="mesh-key set-owner"):
        log.apply(_chain((GRANT, ALICE, ""))[0])


def test_entries_after_pages_in_order() -> None:
    entries = _chain(*[(GRANT, bytes([i]) * 32, f"k{i}") for i in range(10)])
    log = _log(*entries)
    assert log.entries_after(0, 4) == entries[:4]
    assert log.entries_after(4, 4) == entries[4:8]
    assert log.entries_after(8, 4) == entries[8:]
    assert log.entries_after(10, 4) == [] and log.entries_after(3, 0) == []
    copy = SubmitterLog(OWNER_PUB)  # a node fed page by page ends with the same log
    for start in range(0, 10, 3):
        for e in log.entries_after(start, 3):
            copy.apply(e)
    assert copy.version == 10 and copy.head == log.head


def test_the_log_is_bounded() -> None:
    e1, e2 = _chain((GRANT, ALICE, ""), (GRANT, BOB, ""))
    log = SubmitterLog(OWNER_PUB, max_entries=1)
    assert log.apply(e1)
    with pytest.raises(LogFull):
        log.apply(e2)
    assert MAX_LOG_ENTRIES == 65_536


def test_entries_survive_the_wire() -> None:
    entries = tuple(_chain((GRANT, ALICE, "ålice ✓"), (REVOKE, ALICE, "")))
    message = decode_body(encode_body(SubmittersEntries(entries=entries)))
    assert isinstance(message, SubmittersEntries) and message.entries == entries
    assert _log(*message.entries).version == 2
