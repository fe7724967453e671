"""docs/case-files.md stays true to the parser in harness/sweep/cases.py.

Every key the parser reads is documented in the section for its level, nothing else is, and the
page's example parses into exactly the case names the page shows.
"""

from __future__ import annotations

import re
from pathlib import Path

from harness.environment import PROJECT_ROOT
from harness.sweep.cases import ENTRY_KEYS, FILE_KEYS, OPTION_KEYS, load_case_file

DOC = PROJECT_ROOT / "docs" / "case-files.md"


def section(title: str) -> str:
    text = DOC.read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"docs/case-files.md has no section {title!r}"
    return match.group(1)


def documented_keys(title: str) -> list[str]:
    """The keys in the first column of a section's table, in order."""
    return re.findall(r"^\| `([a-z_]+)` \|", section(title), re.M)


def test_every_top_level_key_is_documented_and_only_those():
    assert sorted(documented_keys("Top-level keys")) == sorted(FILE_KEYS)


def test_every_entry_key_is_documented_and_only_those():
    assert sorted(documented_keys("Entry keys (`[[case]]`)")) == sorted(ENTRY_KEYS)


def test_every_option_key_is_documented_and_only_those():
    assert sorted(documented_keys("Options (`options = { ... }`)")) == sorted(OPTION_KEYS)


def test_the_example_parses_into_the_case_names_the_page_shows(tmp_path):
    example = section("An example")
    toml_block = re.search(r"```toml\n(.*?)```\n", example, re.S)
    toml = toml_block.group(1)
    shown = re.search(r"^```\n(.*?)^```", example[toml_block.end():], re.S | re.M).group(1).split()
    path = tmp_path / "example.toml"
    path.write_text(toml)
    assert [case.name for case in load_case_file(path)] == shown
