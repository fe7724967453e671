"""Shared test setup: the gate's Hypothesis profiles, with ``ci`` loaded when ``CI`` is set."""

import os

from hypothesis import settings

import harness  # noqa: F401 - sets TRITON_INTERPRET before any test imports triton
from harness.check.profiles import register_profiles

register_profiles()
if os.environ.get("CI"):
    settings.load_profile("ci")
