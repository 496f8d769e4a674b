"""Pure formulas of an all-reduce round: group order, round id, slices, chunks, layout digest.

Every member computes these from the same inputs and gets the same answer, so none of
them is ever sent: the group is the sorted set of node ids, the round id a hash of
(group, key), slice ``s`` is a contiguous range of the flattened tensor initially owned by
member ``s``, cut in proportion to the (agreed) weights with the largest-remainder rule.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction

from protocol.errors import ConfigError
from protocol.limits import NODE_ID_BYTES
from protocol.messages.tensor import LAYOUT_BYTES, MAX_GROUP, MAX_NUMEL, ROUND_ID_BYTES

#: Longest user key (job id, step number) that names a round.
MAX_KEY_BYTES = 256

_ROUND_PERSON = b"starmesh-ar-rid1"
_LAYOUT_PERSON = b"starmesh-ar-lay1"


def canonical_group(group: Iterable[bytes]) -> tuple[bytes, ...]:
    """The group in canonical order (node ids ascending). ``ConfigError`` on bad ids or duplicates."""
    ids = list(group)
    for node in ids:
        if type(node) is not bytes or len(node) != NODE_ID_BYTES:
            raise ConfigError(f"group members must be {NODE_ID_BYTES}-byte node ids, got {node!r:.40}")
    out = tuple(sorted(set(ids)))
    if len(out) != len(ids):
        raise ConfigError("group lists a member twice")
    if not 1 <= len(out) <= MAX_GROUP:
        raise ConfigError(f"group must have 1..{MAX_GROUP} members, got {len(out)}")
    return out


def round_id(group: Sequence[bytes], key: bytes) -> bytes:
    """``BLAKE2b-128(person="starmesh-ar-rid1"; u32 len(key) | key | u16 n | ids ascending)``."""
    if type(key) is not bytes or len(key) > MAX_KEY_BYTES:
        raise ConfigError(f"round key must be bytes of at most {MAX_KEY_BYTES}, got {key!r:.40}")
    members = canonical_group(group)
    h = hashlib.blake2b(digest_size=ROUND_ID_BYTES, person=_ROUND_PERSON)
    h.update(struct.pack(">I", len(key)) + key + struct.pack(">H", len(members)))
    for node in members:
        h.update(node)
    return h.digest()


def slice_sizes(numel: int, weights: Sequence[float]) -> tuple[int, ...]:
    """Split ``numel`` elements into ``len(weights)`` slices proportional to ``weights``.

    Exact rational quotas ``numel * w_i / sum(w)``; each slice gets the floor, and the
    leftover elements go one each to the largest fractional parts (ties: lower index).
    A zero weight gives an empty slice. ``ConfigError`` unless weights are finite, >= 0,
    and not all zero.
    """
    if not weights or any(not math.isfinite(w) or w < 0 for w in weights):
        raise ConfigError(f"slice weights must be finite and >= 0, got {list(weights)!r:.80}")
    exact = [Fraction(w) for w in weights]
    total = sum(exact)
    if total == 0:
        raise ConfigError("slice weights are all zero")
    quotas = [numel * w / total for w in exact]
    sizes = [math.floor(q) for q in quotas]
    order = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - sizes[i]), i))
    for i in order[: numel - sum(sizes)]:
        sizes[i] += 1
    return tuple(sizes)


def weights_for(members: Sequence[bytes], weights: Mapping[bytes, float] | None) -> tuple[float, ...]:
    """Weights in member order (1.0 for everyone when ``weights`` is None; 0.0 if unlisted)."""
    if weights is None:
        return (1.0,) * len(members)
    unknown = set(weights) - set(members)
    if unknown:
        raise ConfigError(f"weights name {len(unknown)} node(s) outside the group")
    return tuple(float(weights.get(m, 0.0)) for m in members)


def offsets_of(sizes: Sequence[int]) -> tuple[int, ...]:
    """Start of each slice in the flattened tensor."""
    out, at = [], 0
    for n in sizes:
        out.append(at)
        at += n
    return tuple(out)


def chunk_count(length: int, chunk_elements: int) -> int:
    """Chunks of a slice of ``length`` elements (0 for an empty slice)."""
    return -(-length // chunk_elements)


def chunk_span(length: int, chunk_elements: int, index: int) -> tuple[int, int]:
    """``(start, count)`` of chunk ``index`` within its slice."""
    start = index * chunk_elements
    return start, min(chunk_elements, length - start)


def layout_digest(numel: int, sizes: Sequence[int], chunk_elements: int, codec_name: str) -> bytes:
    """What AR_BEGIN carries: members agree on all of these or exclude each other (MISMATCH)."""
    if not 1 <= numel <= MAX_NUMEL:
        raise ConfigError(f"tensor must have 1..{MAX_NUMEL} elements, got {numel}")
    h = hashlib.blake2b(digest_size=LAYOUT_BYTES, person=_LAYOUT_PERSON)
    h.update(struct.pack(">QII", numel, chunk_elements, len(sizes)))
    h.update(b"".join(struct.pack(">Q", n) for n in sizes))
    h.update(codec_name.encode())
    return h.digest()


def ring_order(n: int, me: int) -> tuple[int, ...]:
    """The other members starting after ``me`` (so member i first serves i+1: load spreads)."""
    return tuple((me + k) % n for k in range(1, n))


def median(values: Sequence[float]) -> float:
    """The usual median: the middle value, or the mean of the two middle values."""
    s = sorted(values)
    k = len(s) // 2
    return s[k] if len(s) % 2 else (s[k - 1] + s[k]) / 2


def norm_outliers(norms: Mapping[int, float], factor: float | None) -> set[int]:
    """Members whose norm exceeds ``factor * median(norms)``. Needs >= 3 norms (with two,
    neither can be told to be the odd one out); ``factor=None`` disables the check."""
    if factor is None or len(norms) < 3:
        return set()
    limit = factor * median(list(norms.values()))
    return {m for m, v in norms.items() if v > limit}
