"""Suite-wide settings: property tests are derandomized so every run checks the same cases."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "deterministic",
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
# STARMESH_HYPOTHESIS_PROFILE=explore lets a developer search with fresh randomness.
settings.register_profile("explore", deadline=None, max_examples=2000)
settings.load_profile(os.environ.get("STARMESH_HYPOTHESIS_PROFILE", "deterministic"))
