"""Profiles of the gate: how many cases each property checks, and how they are drawn.

Every property first runs its explicit examples (``harness.check.examples``), whatever the profile.
The profile then sets how many cases Hypothesis draws on top:

- ``ci``: a **fixed count** per property (``drawn_per_share`` times the property's ``share``), each
  property drawing from a seed of its own (a hash of its id), with no deadline: the same cases on
  every run and on every machine, however fast or loaded, so that a kernel author's laptop, a CI
  runner and a colleague's machine give one verdict. The default when the ``CI`` variable is set.
- ``dev``: a **time budget** of 300 s of drawn cases per implementation, shared among the properties
  by their ``share``, fresh random cases on every run; the default otherwise. A property gets as
  many cases as fit in its part of the budget at the speed its explicit examples ran, and the
  budget is also a deadline (an implementation that compiles for every new option set ran its
  explicit examples from its cache, and pays a compile per drawn case).
- ``thorough``: 1800 s, for a kernel author before a release.

``--max-examples N`` replaces either by exactly N drawn cases per property. No profile has a
Hypothesis deadline: Triton compiles (and its interpreter runs) a kernel the first time it sees a
shape, which takes seconds. A property on one implementation has a time limit
(``Profile.time_limit_s``, or ``check --timeout``), so that a hang fails it as a timeout instead of
stopping the check; its explicit examples, first compiles and the shrinking of a failure are
outside any budget, so the limit is generous.
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
# its first ``min_drawn`` cases may overrun), or, for a fixed count, 10 s a drawn case: a compile
# and a Triton-interpreter run, about six times the slowest mean seen on a 2-core CPU
# (torch.compile: 1.7 s a case). The unbudgeted part is generous: torch.compile recompiles for each
# explicit example's shape, and took 380 s over equivalence/float32's on the loaded 2-core CPU
# machine (2026-12-07); a limit a slow machine hits would make the verdict depend on its speed.
UNBUDGETED_S = 900.0
SECONDS_PER_DRAWN_CASE = 10.0


@dataclass(frozen=True)
class Profile:
    name: str
    budget_s: float | None  # seconds of drawn cases per implementation (None: a fixed count)
    min_drawn: int  # drawn cases per property, however slow the implementation
    max_drawn: int
    seeded: bool  # the same cases on every run (a seed per property)
    drawn_per_share: int | None = None  # the fixed count: drawn cases per unit of a property's share
    max_examples: int | None = None  # --max-examples: exactly this many drawn cases per property

    @property
    def fixed(self) -> bool:
        """Whether the number of drawn cases is independent of the machine's speed."""
        return self.max_examples is not None or self.drawn_per_share is not None

    def drawn_examples(self, share: float, total_share: float, seconds_per_case: float | None) -> int:
        """How many cases Hypothesis draws for a property of ``share`` (of ``total_share``)."""
        if self.max_examples is not None:
            return self.max_examples
        if self.drawn_per_share is not None:
            return max(self.min_drawn, min(self.max_drawn, round(self.drawn_per_share * share)))
        if not seconds_per_case:
            return self.min_drawn
        fits = int(self.budget_s * share / total_share / seconds_per_case)
        power = 1 << max(0, fits.bit_length() - 1) if fits else 0
        return max(self.min_drawn, min(self.max_drawn, power))

    def deadline_s(self, share: float, total_share: float) -> float | None:
        """Seconds after which a property's remaining drawn cases are skipped (None: never)."""
        return None if self.fixed else self.budget_s * share / total_share

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

    def time_limit_s(self, drawn_per_property: int | None = None) -> float:
        """Seconds one property may take on one implementation before it fails as a timeout."""
        if self.fixed:
            count = self.max_examples if self.max_examples is not None else self.max_drawn
            return UNBUDGETED_S + SECONDS_PER_DRAWN_CASE * (drawn_per_property or count)
        return UNBUDGETED_S + 2 * self.budget_s

    def seed_for(self, property_id: str) -> int | None:
        """The property's own seed in a seeded profile (stable across runs and machines)."""
        return zlib.crc32(property_id.encode()) if self.seeded else None

    def describe(self) -> str:
        """What the profile draws besides the explicit examples, in a few words."""
        if self.max_examples is not None:
            return f"{self.max_examples} drawn cases per property"
        if self.drawn_per_share is not None:
            return f"{self.drawn_per_share} seeded drawn cases per property (fewer for the costly ones)"
        return f"{self.budget_s:g} s of random drawn cases per implementation"


_PROFILES = {
    "ci": Profile("ci", budget_s=None, min_drawn=2, max_drawn=8, seeded=True, drawn_per_share=8),
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
