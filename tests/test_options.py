"""Each loss option is declared once (``harness.spec.OPTION_DECLARATIONS``); everything else derives from it."""

from pathlib import Path

import pytest

from harness.case import Case, OptionValues, parse_case
from harness.errors import HarnessError
from harness.spec import OPTION_DECLARATIONS, OPTIONS
from harness.sweep.cases import load_case_file

SEMANTICS_PAGE = Path(__file__).resolve().parent.parent / "docs" / "semantics.md"


@pytest.mark.parametrize("option", OPTION_DECLARATIONS, ids=lambda o: o.name)
def test_the_docs_option_table_gives_each_option_its_declaration(option):
    field = f"`{option.spec_field}`" if option.spec_field else "an input"
    row = f"| `{option.name}` | {field} | `{option.default}` | {option.meaning} |"
    assert row in SEMANTICS_PAGE.read_text().splitlines(), f"docs/semantics.md's option table lacks this row:\n{row}"


@pytest.mark.parametrize("option", OPTION_DECLARATIONS, ids=lambda o: o.name)
def test_every_strong_value_turns_its_option_on_in_a_case_line_and_back(option):
    for value in option.values:
        case = Case.build(tokens=(3,), dim=4, vocab=5, **{option.name: value})
        assert case.options_used() == {option.name}
        assert parse_case(str(case)) == case
        if option.spec_field is not None:
            assert getattr(case.spec(), option.spec_field) == value


def test_defaults_are_dropped_so_equal_cases_are_equal():
    assert OptionValues.of(softcap=None, bias=False) == OptionValues()
    assert Case.build(tokens=(3,), dim=4, vocab=5, z_loss=0.0) == Case(tokens=(3,), dim=4, vocab=5)


def test_an_unknown_option_is_one_clear_line():
    with pytest.raises(HarnessError, match="unknown option 'temperature'"):
        OptionValues.of(temperature=2.0)


def test_a_case_file_takes_options_by_name_and_their_older_names(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("""
[[case]]
name = "a"
vocab = 64
dim = 8
tokens = 4
dtypes = ["float32"]
options = { z_loss = 0.01, reduction = "sum" }

[[case]]
name = "b"
vocab = 64
hidden = 8
tokens = 4
dtypes = ["float32"]
options = { z_loss_multiplier = 0.01, reduction = "sum" }
""")
    a, b = (sweep_case.case for sweep_case in load_case_file(path))
    assert a == b
    assert a.spec().z_loss_multiplier == 0.01 and a.reduction == "sum" and a.dim == 8


@pytest.mark.parametrize(
    "options, complaint",
    [
        ("{ bias = 1 }", "option 'bias' has a bad value 1 (expected true or false)"),
        ("{ ignore_index = 1.5 }", "option 'ignore_index' has a bad value 1.5 (expected an integer)"),
        ("{ softcap = 'big' }", "option 'softcap' has a bad value 'big' (expected a number)"),
        ("{ softcap = -1 }", "softcap must be a positive number"),
        ("{ temperature = 2 }", "unknown option 'temperature'"),
    ],
)
def test_a_bad_option_in_a_case_file_is_one_line_naming_the_entry(tmp_path, options, complaint):
    path = tmp_path / "bad.toml"
    path.write_text(f"[[case]]\nname = 'x'\nvocab = 8\ndim = 4\ntokens = 2\ndtypes = ['float32']\noptions = {options}\n")
    with pytest.raises(HarnessError) as error:
        load_case_file(path)
    assert "entry 'x'" in str(error.value) and complaint in str(error.value)


def test_the_option_vocabulary_is_the_declarations_in_order():
    assert OPTIONS == tuple(option.name for option in OPTION_DECLARATIONS)
