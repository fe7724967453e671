"""Profiles of the gate: how many cases each property checks, and how they are drawn.

Every property first runs its explicit examples (``harness.check.examples``: every option pair in
every dtype, block edges, ...), whatever the profile. The profile then sets the **time budget**
for cases Hypothesis draws on top, per implementation, shared among the properties by their
``share``: a property gets as many drawn cases as fit in its part of the budget at the mean
speed its explicit examples ran, rounded down to a power of two (so that small changes in speed do
not change what is checked), between ``min_drawn`` and ``max_drawn``. A cheap plugin gets hundreds
of cases in the time a Triton-interpreter run gets a few. The budget is also a deadline
(``harness.check.run_property``): an implementation that compiles for every new option set ran its
explicit examples from its cache, and pays a compile per drawn case.

- ``ci``: a 30 s budget; each property draws from a seed of its own (a hash of its id, so the
  float32, bfloat16 and float16 properties see different cases), the same on every run: CI
  never flakes on a case it did not see before. The default when the ``CI`` variable is set.
- ``dev``: 300 s, fresh random cases on every run; the default otherwise.
- ``thorough``: 1800 s, for a kernel author before a release.

``--max-examples N`` replaces the budget by exactly N drawn cases per property. No profile has a
Hypothesis deadline: Triton compiles (and its interpreter runs) a kernel the first time it sees a
shape, which takes seconds.

A property on one implementation has a time limit (``Profile.time_limit_s``, or ``check
--timeout``), so that a hang fails it as a timeout instead of stopping the check: its share of the
budget is far below it, but its explicit examples, first compiles and the shrinking of a failure
are outside any budget, so the limit is generous.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from dataclasses import dataclass

from hypothesis import HealthCheck, Phase, Verbosity, settings

PROFILES = ("ci", "dev", "thorough")

# Slow cases (Triton's interpreter, compiles) and large ones are the point, not a problem.
_SLOW_IS_FINE = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

# The time limit of a property: what no budget bounds (explicit examples, compiles, shrinking), plus
# the whole budget of the implementation twice over (a property's share of it is a deadline that
# its first ``min_drawn`` cases may overrun). Under ``--max-examples`` there is no budget: a drawn
# case is allowed 10 s, a compile and a Triton-interpreter run, about six times the slowest mean
# seen on a 2-core CPU (torch.compile: 1.7 s a case).
UNBUDGETED_S = 300.0
SECONDS_PER_DRAWN_CASE = 10.0


@dataclass(frozen=True)
class Profile:
    name: str
    budget_s: float  # seconds of drawn cases per implementation, all properties together
    min_drawn: int  # drawn cases per property, however slow the implementation
    max_drawn: int
    seeded: bool  # the same cases on every run (a seed per property)
    max_examples: int | None = None  # --max-examples: exactly this many drawn cases per property

    def drawn_examples(self, fraction: float, seconds_per_case: float | None) -> int:
        """How many cases Hypothesis draws for a property given ``fraction`` of the budget."""
        if self.max_examples is not None:
            return self.max_examples
        if not seconds_per_case:
            return self.min_drawn
        fits = int(self.budget_s * fraction / seconds_per_case)
        power = 1 << max(0, fits.bit_length() - 1) if fits else 0
        return max(self.min_drawn, min(self.max_drawn, power))

    def hypothesis_settings(self, examples: int) -> settings:
        return settings(
            max_examples=max(1, examples),
            deadline=None,
            database=None,
            derandomize=False,
            phases=[Phase.generate, Phase.target, Phase.shrink],
            suppress_health_check=_SLOW_IS_FINE,
            report_multiple_bugs=False,
            print_blob=False,
            verbosity=Verbosity.quiet,
        )

    def time_limit_s(self) -> float:
        """Seconds one property may take on one implementation before it fails as a timeout."""
        if self.max_examples is not None:
            return UNBUDGETED_S + SECONDS_PER_DRAWN_CASE * self.max_examples
        return UNBUDGETED_S + 2 * self.budget_s

    def seed_for(self, property_id: str) -> int | None:
        """The property's own seed in a seeded profile (stable across runs and machines)."""
        return zlib.crc32(property_id.encode()) if self.seeded else None


_PROFILES = {
    "ci": Profile("ci", budget_s=30.0, min_drawn=2, max_drawn=256, seeded=True),
    "dev": Profile("dev", budget_s=300.0, min_drawn=4, max_drawn=1024, seeded=False),
    "thorough": Profile("thorough", budget_s=1800.0, min_drawn=16, max_drawn=8192, seeded=False),
}


def get_profile(name: str, max_examples: int | None = None) -> Profile:
    profile = _PROFILES[name]
    return profile if max_examples is None else dataclasses.replace(profile, max_examples=max_examples)


def default_profile() -> str:
    return "ci" if os.environ.get("CI") else "dev"


def register_profiles() -> None:
    """Hypothesis profiles of the same names for the test suite (``tests/conftest.py``)."""
    common = dict(deadline=None, database=None, print_blob=False, suppress_health_check=_SLOW_IS_FINE)
    settings.register_profile("ci", derandomize=True, max_examples=10, **common)
    settings.register_profile("dev", max_examples=25, **common)
    settings.register_profile("thorough", max_examples=200, **common)
