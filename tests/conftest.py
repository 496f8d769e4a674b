"""Suite-wide settings: property tests are derandomized so every run checks the same cases,
and no test reads or writes the developer's own submitter key (``~/.config/starmesh``)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
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


@pytest.fixture(autouse=True, scope="session")
def _private_config_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Point ``XDG_CONFIG_HOME`` (inherited by node processes) at a temporary dir and drop
    ``STARMESH_SUBMITTER_KEY``: a first node makes its owner's submitter key there."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config-home")))
        patch.delenv("STARMESH_SUBMITTER_KEY", raising=False)
        yield
