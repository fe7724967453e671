"""``python -m harness list``: one line per implementation, within the terminal's width, and quiet."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from harness.cli import main
from harness.environment import PROJECT_ROOT
from harness.registry import builtin_names


def test_list_fits_80_columns_with_one_line_per_implementation(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    too_wide = [line for line in lines if len(line) > 80]
    assert not too_wide, too_wide
    for name in builtin_names():
        assert len([line for line in lines if line.startswith(name + " ")]) == 1, name


def test_verbose_adds_the_options_wrapped_to_the_width(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["list", "--impl", "liger", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "  dtypes: float32, bfloat16, float16" in out and "  unsupported:" in out


@pytest.mark.slow
def test_the_peer_packages_import_warnings_are_captured_not_printed():
    """In a fresh process, where megatron-core and OLMo-core warn as they are first imported."""
    done = subprocess.run([sys.executable, "-m", "harness", "list"], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "COLUMNS": "80"})
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "Warning" not in done.stdout and "transformer_engine" not in done.stdout
