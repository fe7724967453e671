"""The ci profile gives one verdict everywhere: a fixed, seeded set of cases per property, whatever the
machine's speed or load. dev and thorough keep their time budgets (fresh cases, as many as fit)."""

import itertools

import pytest

from harness.check import run_property as run_property_module
from harness.check.profiles import get_profile
from harness.check.properties import find_property
from harness.check.run_property import Target, run_property
from harness.check.support_probe import discover_support
from harness.registry import resolve

PLUGIN = "tests.plugin_examples:plain_eager"


def cases_checked(monkeypatch, seconds_per_tick: float, profile: str) -> list[str]:
    """The cases one property checks when every clock reading is ``seconds_per_tick`` after the last
    (a slow, loaded machine: large; a fast one: small)."""
    clock = itertools.count()
    monkeypatch.setattr(run_property_module.time, "perf_counter", lambda: next(clock) * seconds_per_tick)
    target = Target(PLUGIN, resolve(PLUGIN))
    seen: list[str] = []
    result = run_property(target, find_property("invariance/permutation"), discover_support(target.impl, "cpu"),
                          get_profile(profile), "cpu", on_case=lambda case: seen.append(str(case)))
    assert result.status == "pass", result.detail
    return seen


def test_the_ci_profile_checks_the_same_cases_on_a_fast_and_a_slow_machine(monkeypatch):
    fast = cases_checked(monkeypatch, 1e-4, "ci")
    slow = cases_checked(monkeypatch, 100.0, "ci")
    assert fast == slow and len(fast) > 1


@pytest.mark.slow
def test_a_time_budgeted_profile_checks_fewer_cases_on_a_slow_machine(monkeypatch):
    """The contrast: dev draws as many cases as fit in its budget at the measured speed."""
    if get_profile("dev").budget_s is None:
        pytest.fail("dev must keep a time budget")
    slow = cases_checked(monkeypatch, 100.0, "dev")
    fast = cases_checked(monkeypatch, 0.1, "dev")  # about half a second a case: a dozen or so fit
    assert len(slow) < len(fast)


def test_the_ci_count_is_fixed_per_property_and_scaled_by_its_share():
    ci = get_profile("ci")
    assert ci.fixed and ci.deadline_s(1.0, 7.0) is None
    assert ci.drawn_examples(1.0, 7.0, 0.001) == ci.drawn_examples(1.0, 7.0, 60.0) == ci.drawn_per_share
    assert ci.drawn_examples(0.3, 7.0, None) == max(ci.min_drawn, round(0.3 * ci.drawn_per_share))
