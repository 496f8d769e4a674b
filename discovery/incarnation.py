"""Bounds on our own incarnation, as pure functions (SWIM section 4.2; memberlist refute).

Theory of operation
-------------------
Only a member raises its own incarnation: by one at each restart (above the one it persisted),
at a metadata update, and above a claim about it that it refutes (``max(own, claim) + 1``).
The wire carries a ``uint64``, but a member that followed every claim would be pushed past it
by one lie (a ``Suspect`` at ``2**64 - 1`` makes the refutation ``2**64``), and whatever it
persists must be accepted by its next start. So:

* Our incarnation never exceeds ``MAX_INCARNATION`` (``2**62``): every raise saturates there,
  and a restart accepts any persisted value up to it (``start_incarnation``). What we persist
  is therefore always what the next start accepts, and always fits the wire.
* A claim about us more than ``MAX_CLAIM_JUMP`` (``2**32``) above our incarnation, or at or
  above ``MAX_INCARNATION`` (no refutation could beat it), is *refused*: ignored, and counted
  by the caller. An honest claim is never far above us: others only hold incarnations we
  gave ourselves, and a restarted member starts one above the last it persisted (a member
  that lost its files starts at 0, a few restarts or updates below the truth).

Claims about *other* members follow SWIM unchanged, at any ``uint64``: nothing here adds to
another member's incarnation, so they cannot overflow.
"""

from __future__ import annotations

from protocol.errors import ConfigError

#: The highest incarnation a member gives itself (and accepts from its own persisted file).
MAX_INCARNATION = 1 << 62

#: Claims about us more than this above our incarnation are refused as implausible.
MAX_CLAIM_JUMP = 1 << 32


def refutation_incarnation(own: int, claim: int) -> int | None:
    """The incarnation that refutes a claim about us at ``claim`` while ours is ``own``:
    ``max(own, claim) + 1``, saturated at ``MAX_INCARNATION``. None when the claim is refused
    (more than ``MAX_CLAIM_JUMP`` above ``own``, or at or above ``MAX_INCARNATION``)."""
    if claim >= MAX_INCARNATION or claim - own > MAX_CLAIM_JUMP:
        return None
    return min(max(own, claim) + 1, MAX_INCARNATION)


def bumped_incarnation(own: int) -> int:
    """Our incarnation after a metadata update: one more, saturated at ``MAX_INCARNATION``."""
    return min(own + 1, MAX_INCARNATION)


def start_incarnation(last_incarnation: int) -> int:
    """The incarnation a (re)started member begins at: one above the last it persisted
    (saturated at ``MAX_INCARNATION``). A persisted value outside ``[0, MAX_INCARNATION]`` was
    never written by a member (a corrupt file): ``ConfigError``."""
    if not 0 <= last_incarnation <= MAX_INCARNATION:
        raise ConfigError(
            f"persisted incarnation {last_incarnation} is implausible "
            f"(above {MAX_INCARNATION}); delete the incarnation file"
        )
    return bumped_incarnation(last_incarnation)
