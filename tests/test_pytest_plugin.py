"""The pytest plugin (``harness.pytest_plugin``): the gate as test items of a kernel author's own suite.

Each (implementation, property) is one item, so ``-k`` and ``--junit-xml`` see them; its outcome
is the property's status (a failure's message starts with the reproducer); a built-in's known
failure is a strict xfail on the property its example names. The slow test installs the project
into a fresh virtual environment, as a kernel author would, and gates a throw-away package's
correct and buggy kernels through the installed ``pytest11`` entry point.
"""

import dataclasses
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness import pytest_plugin
from harness.check.properties import PROPERTY_IDS
from harness.check.run_property import FAIL, KNOWN_FAILURE, NOT_APPLICABLE, PASS, UNSUPPORTED, PropertyResult
from harness.environment import PROJECT_ROOT

pytest_plugins = ["pytester"]

# Where the project is installed, the entry point has loaded the plugin already; elsewhere (a
# checkout run from its root) it is named.
INSTALLED = any(ep.value == "harness.pytest_plugin" for ep in importlib.metadata.entry_points(group="pytest11"))
PLUGIN = ["-W", "ignore::pytest.PytestAssertRewriteWarning"] + ([] if INSTALLED else ["-p", "harness.pytest_plugin"])

GATE_TEST = """
def test_lmhead_gate(lmhead_gate):
    lmhead_gate.check()
"""


def test_the_entry_point_names_the_plugin():
    text = (PROJECT_ROOT / "pyproject.toml").read_text()
    assert '[project.entry-points.pytest11]\nlmhead = "harness.pytest_plugin"' in text


def test_every_implementation_and_property_is_an_item_that_k_selects(pytester):
    pytester.makepyfile(test_gate=GATE_TEST)
    names = ["tests.plugin_examples:plain_eager", "torch-eager"]
    impls = [arg for name in names for arg in ("--lmhead-impl", name)]
    collected = pytester.runpytest(*PLUGIN, *impls, "--collect-only", "-q")
    ids = [line for line in collected.outlines if line.startswith("test_gate.py::")]
    assert ids == [f"test_gate.py::test_lmhead_gate[{n}-{p}]" for n in names for p in PROPERTY_IDS]

    selected = pytester.runpytest(*PLUGIN, *impls, "--collect-only", "-q", "-k", "plain_eager and equivalence/float16")
    assert [line for line in selected.outlines if line.startswith("test_gate.py::")] == [
        "test_gate.py::test_lmhead_gate[tests.plugin_examples:plain_eager-equivalence/float16]"]


def test_the_marker_names_implementations_and_options_of_its_test(pytester):
    pytester.makepyfile(test_gate="""
import pytest

@pytest.mark.lmhead_gate("tests.plugin_examples:plain_eager", dtypes=["bfloat16"], properties=["equivalence/float32",
                         "equivalence/bfloat16", "autograd/no-grad"])
def test_my_kernel(lmhead_gate):
    lmhead_gate.check()
""")
    collected = pytester.runpytest(*PLUGIN, "--collect-only", "-q")
    assert [line for line in collected.outlines if line.startswith("test_gate.py::")] == [
        "test_gate.py::test_my_kernel[tests.plugin_examples:plain_eager-equivalence/bfloat16]",
        "test_gate.py::test_my_kernel[tests.plugin_examples:plain_eager-autograd/no-grad]"]


def test_a_built_ins_known_failure_is_a_strict_xfail_with_its_reason(pytester):
    pytester.makepyfile(test_gate=GATE_TEST)
    items, _ = pytester.inline_genitems(*PLUGIN, "--lmhead-impl", "liger", "--lmhead-property", "autograd/retain-graph",
                                        "--lmhead-property", "autograd/no-grad")
    marks = {item.callspec.id: item.get_closest_marker("xfail") for item in items}
    retain_graph = marks["liger-autograd/retain-graph"]
    assert retain_graph.kwargs["strict"] and retain_graph.kwargs["raises"] is pytest_plugin.KnownFailureSeen
    assert retain_graph.kwargs["reason"].startswith("known failure: ")
    assert marks["liger-autograd/no-grad"] is None


def test_without_an_implementation_the_gate_is_skipped_with_the_reason(pytester):
    pytester.makepyfile(test_gate=GATE_TEST)
    result = pytester.runpytest(*PLUGIN, "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*no implementation to gate: pass --lmhead-impl NAME*"])


def test_a_bad_name_is_a_one_line_collection_error(pytester):
    pytester.makepyfile(test_gate=GATE_TEST)
    result = pytester.runpytest(*PLUGIN, "--lmhead-impl", "no-such-kernel")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*lmhead_gate: unknown implementation 'no-such-kernel'*"])
    assert "Traceback" not in result.stdout.str()


def canned(status: str, detail: str = "", reproducer: str = "", prop: str = "autograd/no-grad") -> PropertyResult:
    return PropertyResult("tests.plugin_examples:plain_eager", prop, status, 5, detail, reproducer, 0.1)


def test_each_status_is_the_items_outcome_and_a_failures_message_starts_with_its_reproducer(pytester, monkeypatch):
    """The outcomes, with the gate's results made up (the runs themselves are in the slow tests)."""
    reproducer = "python -m harness check --impl tests.plugin_examples:plain_eager --property autograd/no-grad --case 'N=7'"
    outcomes = {
        "equivalence/float32": canned(PASS),
        "equivalence/bfloat16": canned(UNSUPPORTED, "does not support bfloat16"),
        "invariance/chunk-size": canned(NOT_APPLICABLE, "has no chunk size"),
        "autograd/no-grad": canned(FAIL, "raised ValueError: boom\nTraceback (most recent call last):\n  kernel", reproducer),
        "autograd/retain-graph": canned(KNOWN_FAILURE, "the second backward scales again. Seen: ..."),
    }
    monkeypatch.setattr(pytest_plugin.GateRunner, "result",
                        lambda self, node, item: dataclasses.replace(outcomes[item.property], property=item.property))
    pytester.makepyfile(test_gate=GATE_TEST)
    properties = [arg for prop in outcomes for arg in ("--lmhead-property", prop)]
    result = pytester.runpytest(*PLUGIN, "--lmhead-impl", "tests.plugin_examples:plain_eager", *properties, "-rsx")
    result.assert_outcomes(passed=1, skipped=2, failed=1, xfailed=1)
    text = result.stdout.str()
    failure = text.split("_ test_lmhead_gate[tests.plugin_examples:plain_eager-autograd/no-grad] _")[1]
    lines = failure.strip("_ \n").splitlines()
    assert lines[0] == reproducer
    assert lines[1] == "tests.plugin_examples:plain_eager autograd/no-grad: raised ValueError: boom"
    assert "Traceback (most recent call last):" in failure
    assert "known failure: the second backward scales again" in text and "unsupported: does not support" in text


def test_a_known_failure_that_does_not_show_where_expected_fails_the_strict_xfail(pytester, monkeypatch):
    monkeypatch.setattr(pytest_plugin.GateRunner, "result", lambda self, node, item: canned(PASS))
    pytester.makepyfile(test_gate=GATE_TEST)
    result = pytester.runpytest(*PLUGIN, "--lmhead-impl", "liger", "--lmhead-property", "autograd/retain-graph")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*XPASS(strict)*known failure*"])


def test_a_new_failure_on_a_property_with_a_known_failure_still_fails(pytester, monkeypatch):
    monkeypatch.setattr(pytest_plugin.GateRunner, "result", lambda self, node, item: canned(FAIL, "grad_weight: off"))
    pytester.makepyfile(test_gate=GATE_TEST)
    result = pytester.runpytest(*PLUGIN, "--lmhead-impl", "liger", "--lmhead-property", "autograd/retain-graph")
    result.assert_outcomes(failed=1)


@pytest.mark.slow
def test_in_process_mode_shows_the_kernels_traceback(pytester):
    pytester.makepyfile(test_gate=GATE_TEST)
    result = pytester.runpytest(*PLUGIN, "--lmhead-impl", "tests.broken_impls:raises_past_64_tokens",
                                "--lmhead-property", "equivalence/float32", "--lmhead-max-examples", "0",
                                "--lmhead-in-process")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*-m harness check --impl tests.broken_impls:raises_past_64_tokens *--case *",
                                 "*raised ValueError: this kernel's tile holds 64 tokens*",
                                 "*in raises_past_64_tokens*", "*in _check_token_count*"])


# --- as a kernel author installs and runs it ----------------------------------------------------------

KERNELS = '''
"""A throw-away package: a correct loss and one with a bug."""
import torch.nn.functional as F


def good(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean"):
    """(N, D) or (B, T, D) hidden states, as a model passes them."""
    logits = F.linear(hidden, weight, bias).float().flatten(0, -2)
    loss = F.cross_entropy(logits, labels.flatten(), ignore_index=ignore_index, reduction=reduction)
    return loss.view(labels.shape) if reduction == "none" else loss


def bad(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean"):
    """Averages over every token, ignored ones included."""
    losses = good(hidden, weight, labels, bias=bias, ignore_index=ignore_index, reduction="none")
    if reduction == "mean":
        return losses.sum() / labels.numel()
    return losses.sum() if reduction == "sum" else losses
'''

# The author's test file: the gate's item, and a test of their own.
AUTHORS_TEST = '''
"""The lmhead-bench gate over our kernels: pytest --lmhead-impl kern:good (see docs/kernel-authors.md)."""


def test_lmhead_gate(lmhead_gate):
    lmhead_gate.check()


def test_our_own_unit_test():
    assert 1 + 1 == 2
'''


@pytest.fixture(scope="module")
def installed_python(tmp_path_factory) -> Path:
    """A fresh virtual environment with the project installed from a copy of this checkout, as
    ``pip install .`` installs it (its ``pytest11`` entry point included). Its other packages (torch,
    pytest, Hypothesis, the peers) are this environment's, through a ``.pth`` file: no download."""
    root = tmp_path_factory.mktemp("fresh-venv")
    source = root / "lmhead-bench"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PROJECT_ROOT / name, source / name)
    for name in ("harness", "implementations"):
        shutil.copytree(PROJECT_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "env")], check=True, timeout=300)
    python = root / "env" / "bin" / "python"
    site_packages = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip()
    ours = [p for p in sys.path if p.endswith("site-packages")]
    (Path(site_packages) / "test-environment.pth").write_text("\n".join(ours) + "\n")
    install = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                              "--quiet", str(source)], capture_output=True, text=True, timeout=900,
                             env=_without_pythonpath())
    assert install.returncode == 0, install.stdout + install.stderr
    return python


def _without_pythonpath() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "CI")}


@pytest.mark.slow
def test_a_kernel_author_gates_a_good_and_a_bad_kernel_in_their_own_test_suite(installed_python, tmp_path):
    project = tmp_path / "project"
    (project / "kern").mkdir(parents=True)
    (project / "kern" / "__init__.py").write_text(KERNELS)
    (project / "test_kernels.py").write_text(AUTHORS_TEST)
    assert len(AUTHORS_TEST.strip().splitlines()) <= 10
    properties = ["equivalence/float32", "autograd/no-grad"]  # two of the gate's, to keep this test short
    options = [arg for prop in properties for arg in ("--lmhead-property", prop)]
    done = subprocess.run([installed_python, "-m", "pytest", "--lmhead-impl", "kern:good", "--lmhead-impl", "kern:bad",
                           *options, "--lmhead-max-examples", "0", "-q", "-p", "no:cacheprovider",
                           "--junit-xml", str(tmp_path / "junit.xml")], cwd=project, env=_without_pythonpath(),
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 failed, 4 passed" in done.stdout, done.stdout

    testcases = {case.get("name"): [child.tag for child in case]
                 for case in ET.parse(tmp_path / "junit.xml").getroot().iter("testcase")}
    gate = {f"test_lmhead_gate[kern:{kernel}-{prop}]" for kernel in ("good", "bad") for prop in properties}
    assert set(testcases) == gate | {"test_our_own_unit_test"}
    assert [name for name, children in testcases.items() if "failure" in children] == \
        ["test_lmhead_gate[kern:bad-equivalence/float32]"]

    failure = done.stdout.split("_ test_lmhead_gate[kern:bad-equivalence/float32] _")[1].strip("_ \n").splitlines()
    reproducer, reason = failure[0], failure[1]
    assert re.search(r"-m harness check --impl kern:bad --property equivalence/float32 --case '?[BN]=\d+", reproducer)
    assert reason.startswith("kern:bad equivalence/float32: loss: ")
    rerun = subprocess.run(["bash", "-c", reproducer], cwd=tmp_path, env=_without_pythonpath(),
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 1, rerun.stdout + rerun.stderr
    assert "kern:bad  equivalence/float32  fail" in rerun.stdout
    assert f"- {reason}" in rerun.stdout, "it fails the same way"
