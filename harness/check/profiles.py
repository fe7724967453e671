"""Hypothesis profiles of the gate, registered by one function.

- ``ci``: derandomised (the same examples on every run, so no flaky failures), bounded, no
  database. The default when the ``CI`` environment variable is set. Few drawn examples on top
  of each property's explicit ones (``harness.check.properties.explicit_examples``, which cover
  the shapes and options the gate exists for): torch.compile and Cut Cross-Entropy's CPU path
  recompile for nearly every drawn case, several seconds each on a 2-core CPU.
- ``dev``: more examples, fresh and random on every run; the default otherwise, so repeated
  local runs keep exploring.
- ``thorough``: many more random examples, for a kernel author before a release.

No profile has a deadline: Triton compiles (and the Triton interpreter runs) a kernel the first
time it sees a shape, which takes seconds.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

PROFILES = ("ci", "dev", "thorough")

# Drawn examples per property before its share (see harness.check.properties.Property.share).
CI_EXAMPLES = 4
DEV_EXAMPLES = 12
THOROUGH_EXAMPLES = 200

_SLOW_IS_FINE = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]


def register_profiles() -> None:
    """Register ``ci``, ``dev`` and ``thorough`` with Hypothesis (idempotent)."""
    common = dict(deadline=None, suppress_health_check=_SLOW_IS_FINE, report_multiple_bugs=False, print_blob=False)
    settings.register_profile("ci", derandomize=True, database=None, max_examples=CI_EXAMPLES, **common)
    settings.register_profile("dev", database=None, max_examples=DEV_EXAMPLES, **common)
    settings.register_profile("thorough", database=None, max_examples=THOROUGH_EXAMPLES, **common)


def default_profile() -> str:
    return "ci" if os.environ.get("CI") else "dev"


def profile_settings(name: str) -> settings:
    register_profiles()
    return settings.get_profile(name)
