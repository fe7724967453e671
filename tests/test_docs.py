"""The documentation is kept true by tests: the findings page is what the known-issue entries render
to, every relative link and anchor in README.md and docs/ resolves, and the layers that
docs/architecture.md describes hold in the source."""

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from harness.findings import PAGE, REGENERATE, anchor, builtin_page, collect, render, status_of
from harness.known import KnownFailure
from implementations import builtin_implementations

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])


@pytest.fixture(scope="module")
def findings():
    return collect(builtin_implementations())


# --- the findings page ------------------------------------------------------------------------


def test_the_findings_page_is_what_the_known_issue_entries_render_to():
    assert PAGE.read_text() == builtin_page(), (
        f"docs/findings.md disagrees with the adapters' known_issues(): run `{REGENERATE}` to regenerate it"
    )


def test_an_entry_shared_by_implementations_is_listed_once_with_all_their_names(findings):
    (frozen_backbone,) = [f for f in findings if "frozen backbone" in f.entry.reason]
    assert frozen_backbone.implementations == ("liger", "liger-fp32-accum", "liger-cutedsl")
    assert frozen_backbone.devices == ("cpu", "cuda")
    assert len({id(f.entry) for f in findings}) == len(findings)
    assert all(findings.count(f) == 1 for f in findings)


def test_each_reproducer_reruns_the_entrys_example_as_a_check_command(findings):
    (frozen_backbone,) = [f for f in findings if "frozen backbone" in f.entry.reason]
    assert frozen_backbone.reproducers()[0] == (
        "python -m harness check --impl liger --property autograd/grad-subsets "
        "--case 'N=5,D=3,V=17,dtype=float32,reduction=mean,bias=1,grads=weight+bias,seed=5'"
    )
    page = render(findings)
    for finding in findings:
        assert all(f"  {command}" in page.splitlines() for command in finding.reproducers())


def test_an_entry_that_records_a_fixed_version_says_so():
    @dataclasses.dataclass(frozen=True)
    class FixedFailure(KnownFailure):
        fixed_in: str | None = None

    entry = FixedFailure("wrong", "a signature", "autograd/no-grad: N=1,D=1,V=2,seed=0", "peer 1.0",
                         raises=("RuntimeError", "x"), fixed_in="peer 1.1")
    assert status_of(entry) == "fixed in peer 1.1"
    assert status_of(dataclasses.replace(entry, fixed_in=None)) == "open"


def test_the_readme_links_every_package_the_findings_page_lists(findings):
    readme = (ROOT / "README.md").read_text()
    for package in dict.fromkeys(f.entry.package for f in findings):
        assert f"docs/findings.md#{anchor(package)}" in readme, f"README's findings table does not link {package}"


# --- links and anchors ------------------------------------------------------------------------

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def prose(text: str) -> str:
    """The text a reader sees links in: no fenced code, no inline code, no HTML comments."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = FENCE.sub("", text)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (a repeated heading gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    result = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = anchor(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: are not checked here
            continue
        path_part, _, fragment = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        if root not in resolved.parents and resolved != root:
            broken.append(f"{target} (outside the repository)")
        elif not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{target} (no heading with that anchor)")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    assert broken_links(page) == [], f"broken links in {page.relative_to(ROOT)}"


def test_the_link_check_finds_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "other.md").write_text("# A `code` heading: yes\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#a-code-heading-yes) [ok](other.md#twice-1) [ok](#here) [web](https://example.com)\n"
        "# Here\n\n[gone](missing.md) [no anchor](other.md#nowhere) `[in code](missing.md)` [up](../x.md)\n\n"
        "```\n[in a block](missing.md)\n```\n"
    )
    assert broken_links(page, root=tmp_path) == [
        "missing.md (no such file)", "other.md#nowhere (no heading with that anchor)", "../x.md (outside the repository)",
    ]


def test_headings_get_githubs_anchors():
    assert anchor("ai2-olmo-core 3.0.0 with liger-kernel 0.8.5") == "ai2-olmo-core-300-with-liger-kernel-085"
    assert anchor("`chunked`: its figures") == "chunked-its-figures"
    assert anchor("1. Known failure in `autograd/grad-subsets`") == "1-known-failure-in-autogradgrad-subsets"


# --- the layers -------------------------------------------------------------------------------


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return modules


def _imports(path: Path, prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in imported_modules(path) if m.split(".")[0] in prefixes or m.startswith(prefixes))


COMMANDS = ("harness.check", "harness.sweep", "harness.report")


@pytest.mark.parametrize("command", COMMANDS)
def test_a_command_imports_no_implementation_and_no_other_command(command):
    allowed = {"harness/sweep/command.py": ["harness.report.command"]}  # a preset sweep builds its report
    for path in sorted((ROOT / command.replace(".", "/")).rglob("*.py")):
        others = tuple(c for c in COMMANDS if c != command)
        found = _imports(path, ("implementations", *others))
        assert found == allowed.get(str(path.relative_to(ROOT)), []), f"{path.relative_to(ROOT)} imports {found}"


def test_the_core_reaches_implementations_only_through_the_registry_and_the_findings_page():
    allowed = {"registry.py": ["implementations"], "findings.py": ["implementations"]}
    gate_api = ("__init__.py", "api.py", "pytest_plugin.py")  # the public API is the gate's, in Python
    for path in sorted((ROOT / "harness").glob("*.py")):
        found = _imports(path, ("implementations", *COMMANDS))
        if path.name in gate_api:
            found = [module for module in found if not module.startswith("harness.check")]
        assert found == allowed.get(path.name, []), f"harness/{path.name} imports {found}"
